"""Stage-2 runtime cost of compression: latency and peak memory of compiled artifacts, side by side.

    python bench/stage2_runtime.py BASELINE_ARTIFACT OTHER_ARTIFACT... [--threads 2] [--repeats 10]

Each artifact is measured in its own fresh Python process (so one run's memory never counts
against another): load it with ``slimgraph.load``, record the resident set, run the entry on
token ids at T=128 and T=1 (median of --repeats after warm-up), and report the peak resident set
of the whole process (``ru_maxrss``: weights as loaded plus every buffer of the forward passes).
The first artifact is the baseline; the table prints each one's ratios to it. Results go to
bench/results/stage2-runtime-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, write_results  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {bench!r})
from common import measure, pin_threads
pin_threads({threads})
import slimgraph
path = {path!r}
t0 = time.perf_counter()
model = slimgraph.load(path)
load_s = time.perf_counter() - t0
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
vocab = {vocab}
out = {{"load_s": load_s, "rss_after_load_mb": rss_loaded / 1024}}
for T in (128, 1):
    ids = np.random.default_rng(T).integers(0, vocab, (1, T)).astype(np.int64)
    out[f"T{{T}}"] = measure(lambda: model(input_ids=ids), warmup=2, repeats={repeats})
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
"""


def artifact_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name in ("model.so", "weights.safetensors"))


def measure_artifact(path: Path, *, threads: int, repeats: int, vocab: int) -> dict:
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), threads=threads, path=str(path),
                        vocab=vocab, repeats=repeats)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-500:]}
    result = json.loads(lines[-1][len("RESULT "):])
    recipe = json.loads((path / "manifest.json").read_text()).get("recipe")
    result.update({"artifact": str(path), "artifact_bytes": artifact_size(path), "recipe": recipe})
    return result


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    print(f"{'artifact':40s} {'MB':>8s} {'T=128 ms':>9s} {'x':>6s} {'T=1 ms':>8s} {'x':>6s} {'peak RSS MB':>12s} {'x':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{r['artifact']:40s} could not run: {r['error'][-200:]}")
            continue
        t128, t1 = r["T128"]["median_ms"], r["T1"]["median_ms"]
        print(f"{Path(r['artifact']).name:40s} {r['artifact_bytes'] / 1e6:8.1f} {t128:9.2f} "
              f"{t128 / base['T128']['median_ms']:6.2f} {t1:8.2f} {t1 / base['T1']['median_ms']:6.2f} "
              f"{r['peak_rss_mb']:12.1f} {r['peak_rss_mb'] / base['peak_rss_mb']:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=49152, help="token ids are drawn from [0, vocab)")
    parser.add_argument("--name", default="stage2-runtime")
    args = parser.parse_args()
    rows = [measure_artifact(p, threads=args.threads, repeats=args.repeats, vocab=args.vocab) for p in args.artifacts]
    print_table(rows)
    path = write_results(args.name, {"machine": machine_description(), "threads": args.threads, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

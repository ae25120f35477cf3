"""Stage-2 int4 accuracy: slimgraph's quantizers against ONNX Runtime's own 4-bit quantizer, side by side.

    python bench/stage2_quant.py [--sweep bench/sweep-int4-vs-ort.toml] [--out bench/.work/sweep-smollm2]
                                 [--ort-methods default,rtn,gptq] [--ort-schemes asym]

Both tools quantize SmolLM2-135M at 4 bits with groups of 128 along the input axis and are scored by
the same perplexity code on the same tokens (the fixed Wikipedia evaluation slice, windows of 512):
slimgraph with its compiled artifacts (``slimgraph eval``), ONNX Runtime with its MatMulNBits models
(``bench/ort_quant.py``). ONNX Runtime quantizes only MatMuls with initializer weights, so SmolLM2's
tied LM head and embedding stay float32 there; the slimgraph rows marked "lm_head fp32" use the same
layer set (a recipe rule), the others quantize the tied table too. slimgraph artifacts and results
are shared with ``slimgraph sweep`` runs into the same --out folder (compiled once, measured once).
Writes bench/results/stage2-quant-<date>.json and prints the table with the verdicts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, WORK_DIR, machine_description, write_results  # noqa: E402


def slimgraph_rows(sweep_file: Path, out: Path) -> list[dict]:
    from slimgraph.compiler.sweep import BASELINE, SweepConfig, load_sweep, measure_config
    from slimgraph.compiler.recipe import recipe_from_flags
    from slimgraph.compiler.cli_eval import artifact_perplexity

    spec = load_sweep(sweep_file)
    evaluate = lambda path, window, max_tokens: artifact_perplexity(path, None, window, max_tokens)[0]  # noqa: E731
    rows = []
    for config in [SweepConfig(BASELINE, BASELINE, {}, recipe_from_flags())] + list(spec.configs):
        print(f"slimgraph: {config.name}", flush=True)
        row = measure_config(spec, config, out, evaluate, lambda kind, payload: None)
        rows.append({"tool": "slimgraph", "method": config.name, "perplexity": row["perplexity"],
                     "model_bytes": row["weight_bytes"], "predicted_tokens": row["predicted_tokens"],
                     "settings": config.settings, "status": "ok"})
    return rows


def ort_rows(methods: tuple, schemes: tuple) -> list[dict]:
    from ort_quant import OrtQuantSettings, run_ort_rows

    rows = run_ort_rows(OrtQuantSettings(methods=methods, schemes=schemes))
    out = []
    for r in rows:
        label = r["method"] if r["method"] == "fp32" else f"int4 g{r['group']} {r['method']} " \
                f"({'sym' if r['symmetric'] else 'asym'}, lm_head fp32)"
        out.append({"tool": r["tool"], "method": label, "perplexity": r.get("perplexity"),
                    "model_bytes": r.get("model_bytes"), "predicted_tokens": r.get("predicted_tokens"),
                    "status": r.get("status", "ok")})
    return out


def verdicts(rows: list[dict]) -> dict:
    """RTN vs GPTQ/AWQ and slimgraph's best calibrated quantizer vs ONNX Runtime's best, like for like."""
    ppl = {(r["tool"].split()[0], r["method"]): r["perplexity"] for r in rows if r["perplexity"] is not None}
    ours = {m: p for (tool, m), p in ppl.items() if tool == "slimgraph"}
    theirs = {m: p for (tool, m), p in ppl.items() if tool == "onnxruntime" and m != "fp32"}
    out = {}
    for scope in ("lm_head fp32", "all layers"):
        rtn = ours.get(f"int4 g128 RTN ({scope})")
        for method in ("GPTQ", "AWQ"):
            value = ours.get(f"int4 g128 {method} ({scope})")
            if rtn is not None and value is not None:
                out[f"{method} below RTN ({scope})"] = value < rtn
    best_ours = min((p for m, p in ours.items() if "lm_head fp32" in m and "RTN" not in m), default=None)
    if best_ours is not None and theirs:
        out["best slimgraph (GPTQ/AWQ, lm_head fp32) <= best ONNX Runtime"] = best_ours <= min(theirs.values())
    return out


def print_table(rows: list[dict], checks: dict) -> None:
    base = {r["tool"].split()[0]: r["perplexity"] for r in rows if r["method"] in ("baseline", "fp32")}
    print(f"\n{'tool':22s} {'method':42s} {'perplexity':>11s} {'delta %':>8s} {'MB':>8s}")
    for r in rows:
        if r["perplexity"] is None:
            print(f"{r['tool']:22s} {r['method']:42s} {r['status']}")
            continue
        ref = base.get(r["tool"].split()[0])
        delta = 100 * (r["perplexity"] / ref - 1) if ref else float("nan")
        print(f"{r['tool']:22s} {r['method']:42s} {r['perplexity']:11.4f} {delta:+8.2f} "
              f"{(r['model_bytes'] or 0) / 1e6:8.1f}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=BENCH_DIR / "sweep-int4-vs-ort.toml")
    parser.add_argument("--out", type=Path, default=WORK_DIR / "sweep-smollm2")
    parser.add_argument("--ort-methods", default="default,rtn,gptq")
    parser.add_argument("--ort-schemes", default="asym")
    args = parser.parse_args()
    rows = slimgraph_rows(args.sweep, args.out)
    rows += ort_rows(tuple(args.ort_methods.split(",")), tuple(args.ort_schemes.split(",")))
    checks = verdicts(rows)
    print_table(rows, checks)
    path = write_results("stage2-quant", {"machine": machine_description(), "rows": rows, "checks": checks})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

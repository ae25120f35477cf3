"""Stage-3 x86: SmolLM2-135M after ``slimgraph tune`` against ONNX Runtime, and int4 decoding against fp32.

    python bench/stage3_x86.py tune [--trials 32] [--db bench/.work/tuning-x86]   # timed: budget 45 min
    python bench/stage3_x86.py measure [--db bench/.work/tuning-x86] [--threads 2] [--repeats 10]

``tune`` runs ``slimgraph tune smollm2 --shape input_ids=1x128`` (MetaSchedule, every kernel of the
T=128 build) and records its wall time next to the database. ``measure``, in one run and at the same
thread count, with nothing else running:

* T=128 fp32 forward pass (logits): ONNX Runtime (the stage-1 ONNX export of the same weights),
  slimgraph untuned and slimgraph with ``--tuning-db`` (both with T fixed to 128), timed in turns (one
  pass of each per round, so a drift of the machine's speed weighs on all three alike; a pause after
  each pass lets the runtime's spinning worker threads go idle before the next starts), each checked
  against ONNX Runtime's output (cosine) so that no runtime is timed doing other work;
* T=1 forward pass: slimgraph fp32 and int4 (group 128, round-to-nearest), T fixed to 1, the int4
  build once more without the one-row products' prefetch of the next task's words (the schedule's
  ``PREFETCH_TASKS_AHEAD = 0``, ``backends/schedules/_prefetch.py``), 3 x ``--repeats`` steps of
  each build in a row (as a decoding loop runs them), and each step's effective weight bandwidth
  (bytes of weights one step reads, embedding rows only for the gathered token, divided by its time)
  against this machine's memory bandwidth measured in the same run (numpy copies of 512 MiB on
  ``--threads`` threads: bytes read + written per second);
* the machine's float32 GEMM ceiling: PyTorch's (oneDNN) 2048 x 2048 x 2048 product on the same
  threads, and every T=128 row's rate in GFLOP/s (the forward pass's multiply-adds, counted from
  the model's config) as a share of it: how far a schedule can go before it beats the best GEMM
  library on this machine;
* the machine's float32 multiply-add peak: ``bench/fma_peak.c`` (built with the system C compiler,
  ``-O3 -march=native``), independent chains of vector FMAs on ``--threads`` threads with no memory
  traffic: no float32 product runs faster, so a T=128 row's share of it bounds what any schedule
  could gain on this machine.

Results go to bench/results/stage3-x86-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (WORK_DIR, cosine, machine_description, measure, measure_interleaved, pin_threads,  # noqa: E402
                    write_results)
from stage1_latency import onnx_file, run_ort  # noqa: E402
from stage3_cuda import _weights_read_per_step  # noqa: E402

DEFAULT_DB = WORK_DIR / "tuning-x86"
COPY_BYTES = 512 << 20
PAUSE_BETWEEN_RUNTIMES_S = 0.2  # ONNX Runtime's and TVM's worker threads spin-wait after a call
T1_ROUNDS_PER_REPEAT = 3  # each T=1 row runs 3 x --repeats steps (a step takes 3-20 ms)


def tune(args) -> None:
    cmd = [sys.executable, "-m", "slimgraph.compiler.cli", "tune", "smollm2", "--shape", "input_ids=1x128",
           "--trials", str(args.trials), "--db", str(args.db)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    elapsed = time.perf_counter() - start
    record = Path(args.db) / "tune-wall-time.json"
    runs = json.loads(record.read_text())["runs"] if record.is_file() else []
    runs.append({"trials": args.trials, "seconds": elapsed})
    record.write_text(json.dumps({"runs": runs, "seconds": sum(r["seconds"] for r in runs)}))
    print(f"this tune run took {elapsed / 60:.1f} min; all runs into this database {sum(r['seconds'] for r in runs) / 60:.1f} min")


def memory_bandwidth(threads: int, repeats: int = 5) -> dict:
    """Best of ``repeats`` copies of COPY_BYTES split over ``threads`` threads (numpy releases the GIL)."""
    src = np.ones(COPY_BYTES // 8, np.float64)
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(src.size), threads)
    spans = [(c[0], c[-1] + 1) for c in chunks]

    def copy(lo, hi):
        np.copyto(dst[lo:hi], src[lo:hi])

    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=copy, args=span) for span in spans]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return {"bytes_moved": 2 * COPY_BYTES, "seconds": best, "gb_per_s": 2 * COPY_BYTES / best / 1e9}


def gemm_ceiling(threads: int, size: int = 2048, repeats: int = 5) -> dict:
    """Best float32 GEMM rate of PyTorch (oneDNN) on ``threads`` threads, in GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return {"size": size, "threads": threads, "gflop_per_s": 2 * size ** 3 / best / 1e9}


def fma_peak(threads: int) -> dict:
    """The float32 FMA peak of ``threads`` threads in GFLOP/s (``bench/fma_peak.c``, built here)."""
    binary = WORK_DIR / "fma_peak"
    binary.parent.mkdir(parents=True, exist_ok=True)
    source = Path(__file__).resolve().parent / "fma_peak.c"
    subprocess.run([os.environ.get("CC", "cc"), "-O3", "-march=native", "-pthread", str(source), "-o", str(binary)],
                   check=True)
    rate, lanes = subprocess.run([str(binary), str(threads)], check=True, capture_output=True,
                                 text=True).stdout.split()
    return {"threads": threads, "vector_lanes": int(lanes), "gflop_per_s": float(rate)}


def forward_flops(config: dict, tokens: int) -> int:
    """Floating-point operations (2 per multiply-add) of a LLaMA forward pass over ``tokens``
    tokens without a cache: the projections, the MLP, attention scores and values, the LM head."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = tokens * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter) + 2 * tokens * tokens * hidden
    return 2 * (config["num_hidden_layers"] * per_layer + tokens * hidden * config["vocab_size"])


def compile_static(name: str, tokens: int, *, tuning_db=None, quantize=None, prefetch: bool = True) -> Path:
    """Build SmolLM2 with T fixed to ``tokens``; ``prefetch=False`` builds the low-bit one-row
    products without their prefetch of the next task's words (the schedule's switch, for the
    side-by-side row)."""
    from slimgraph.backends.schedules import _quantized_gemv
    from slimgraph.compiler.driver import CompileOptions, compile_model
    from slimgraph.compiler.recipe import recipe_from_flags

    recipe = recipe_from_flags(quantize=quantize, group_size=128) if quantize else None
    out = WORK_DIR / "stage3-x86" / name
    ahead, _quantized_gemv.PREFETCH_TASKS_AHEAD = _quantized_gemv.PREFETCH_TASKS_AHEAD, (
        _quantized_gemv.PREFETCH_TASKS_AHEAD if prefetch else 0)
    try:
        compile_model("smollm2", out, CompileOptions(shapes={"input_ids": (1, tokens)}, tuning_db=tuning_db,
                                                     recipe=recipe, force=True))
    finally:
        _quantized_gemv.PREFETCH_TASKS_AHEAD = ahead
    return out


def artifact_call(path: Path, ids: np.ndarray):
    """A function running the artifact at ``path`` on ``ids`` (returns the logits)."""
    import slimgraph

    model = slimgraph.load(path)
    return lambda: model(input_ids=ids)[0]


def measure_all(args) -> None:
    from slimgraph.models.registry import resolve_model

    pin_threads(args.threads)
    rng = np.random.default_rng(0)
    ids128 = rng.integers(0, 49152, (1, 128)).astype(np.int64)
    config = json.loads((Path(resolve_model("smollm2").path) / "config.json").read_text())
    result = {"machine": machine_description(), "threads": args.threads, "memory": memory_bandwidth(args.threads),
              "gemm_ceiling": gemm_ceiling(args.threads), "fma_peak": fma_peak(args.threads),
              "flops_T128": forward_flops(config, 128)}
    db_report = Path(args.db) / "tune-wall-time.json"
    result["tuning"] = json.loads(db_report.read_text()) if db_report.is_file() else None
    result["T128"] = measure_prompt(args, ids128)
    result["T1"] = measure_decoding(args, ids128[:, :1].copy())
    print_summary(result)
    print(f"\nwrote {write_results('stage3-x86', result)}")


def measure_prompt(args, ids: np.ndarray) -> dict:
    """The T=128 rows, timed in turns (each pass streams all weights, so no row leaves another a
    warmer cache), each checked against ONNX Runtime's logits."""
    from slimgraph.models.registry import resolve_model

    calls = {"onnxruntime fp32": run_ort(onnx_file("smollm2", str(resolve_model("smollm2").path)),
                                         {"input_ids": ids}, args.threads)}
    paths = {label: compile_static(label.split()[-1] + "-T128", 128, tuning_db=db)
             for label, db in (("slimgraph fp32 untuned", None), ("slimgraph fp32 tuned", args.db))}
    calls.update({label: artifact_call(path, ids) for label, path in paths.items()})
    rows = measure_interleaved(calls, repeats=args.repeats, pause_s=PAUSE_BETWEEN_RUNTIMES_S)
    reference = calls["onnxruntime fp32"]()
    for label, path in paths.items():
        tuning = json.loads((path / "report.json").read_text()).get("tuning")
        rows[label].update({"cosine_vs_ort": cosine(calls[label](), reference),
                            **({"kernels_matched": len(tuning.get("matched", [])),
                                "kernels_kept_default": len(tuning.get("kept_default", [])),
                                "kernels_fallback": len(tuning.get("fallback", []))} if tuning else {})})
    return rows


def measure_decoding(args, ids: np.ndarray) -> dict:
    """The T=1 rows, one build after the other: steps of one model follow each other, as in a
    decoding loop, so weights that fit the last-level cache may stay there between its steps (the
    steps of another build in between would evict them)."""
    paths = {label: compile_static(f"{quantize or 'fp32'}-T1{'' if prefetch else '-no-prefetch'}", 1,
                                   quantize=quantize, prefetch=prefetch)
             for label, quantize, prefetch in (("slimgraph fp32", None, True), ("slimgraph int4 g128", "int4", True),
                                               ("slimgraph int4 g128, no prefetch", "int4", False))}
    return {label: {**measure(artifact_call(path, ids), repeats=T1_ROUNDS_PER_REPEAT * args.repeats),
                    "weight_bytes_read": _weights_read_per_step(path, 1)} for label, path in paths.items()}


def print_summary(result: dict) -> None:
    t128, t1, mem = result["T128"], result["T1"], result["memory"]
    ort = t128["onnxruntime fp32"]["median_ms"]
    ceiling, flops = result["gemm_ceiling"]["gflop_per_s"], result["flops_T128"]
    peak = result["fma_peak"]["gflop_per_s"]
    print(f"\nSmolLM2-135M T=128 fp32, {result['threads']} threads, median ms ({flops / 1e9:.1f} GFLOP a pass; "
          f"float32 GEMM ceiling {ceiling:.0f} GFLOP/s, FMA peak {peak:.0f} GFLOP/s)")
    for label, row in t128.items():
        rate = flops / (row["median_ms"] / 1e3) / 1e9
        extra = f"  {rate:.0f} GFLOP/s = {100 * rate / ceiling:.0f}% of the ceiling, {100 * rate / peak:.0f}% of the peak"
        extra += f"  cosine vs ORT {row['cosine_vs_ort']:.6f}" if "cosine_vs_ort" in row else ""
        matched = (f"  kernels tuned {row['kernels_matched']}, default faster {row['kernels_kept_default']}, "
                   f"not in the database {row['kernels_fallback']}") if "kernels_matched" in row else ""
        print(f"  {label:26s} {row['median_ms']:9.2f}  {row['median_ms'] / ort:5.2f}x ORT{extra}{matched}")
    need = flops / (0.8 * ort / 1e3) / 1e9
    print(f"  0.8x ORT = {0.8 * ort:.1f} ms needs {need:.0f} GFLOP/s = {100 * need / ceiling:.0f}% of the ceiling, "
          f"{100 * need / peak:.0f}% of the FMA peak")
    fp32, int4 = t1["slimgraph fp32"], t1["slimgraph int4 g128"]
    print(f"\nT=1: fp32 {fp32['median_ms']:.2f} ms, int4 {int4['median_ms']:.2f} ms -> int4 "
          f"{fp32['median_ms'] / int4['median_ms']:.2f}x faster")
    plain = t1.get("slimgraph int4 g128, no prefetch")
    if plain:
        print(f"  int4 without the prefetch of the next task's words: {plain['median_ms']:.2f} ms "
              f"({plain['median_ms'] / int4['median_ms']:.2f}x the time with it)")
    for label, row in t1.items():
        rate = row["weight_bytes_read"] / (row["median_ms"] / 1e3) / 1e9
        print(f"  {label}: {row['weight_bytes_read'] / 1e6:.1f} MB of weights per step -> {rate:.1f} GB/s "
              f"= {100 * rate / mem['gb_per_s']:.0f}% of the measured {mem['gb_per_s']:.1f} GB/s copy bandwidth")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    t = sub.add_parser("tune")
    t.add_argument("--trials", type=int, default=32)
    t.add_argument("--db", default=str(DEFAULT_DB))
    m = sub.add_parser("measure")
    m.add_argument("--db", default=str(DEFAULT_DB))
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    tune(args) if args.step == "tune" else measure_all(args)


if __name__ == "__main__":
    main()

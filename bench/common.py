"""Shared helpers for slimgraph's benchmarks: timing, thread pinning, environment description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / ".work"          # git-ignored: exported models and compiled artifacts
RESULTS_DIR = BENCH_DIR / "results"


def pin_threads(n: int) -> None:
    """Every runtime uses n threads: TVM (TVM_NUM_THREADS), torch, ONNX Runtime (session option), BLAS."""
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


def measure(fn, *, warmup: int = 2, repeats: int = 10) -> dict:
    """Median and spread (min, max, stdev) of fn()'s wall time in milliseconds."""
    return measure_interleaved({"fn": fn}, warmup=warmup, repeats=repeats)["fn"]


def measure_interleaved(fns: dict, *, warmup: int = 2, repeats: int = 10, pause_s: float = 0.0) -> dict:
    """``measure`` of several functions whose calls take turns (one call of each per round), so a
    drift of the machine's speed during the run weighs on all of them alike; name -> summary.
    ``pause_s``: an untimed wait after each call, for the thread pools of one runtime to stop
    spinning before the next runtime's call starts."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
            time.sleep(pause_s)
    return {name: _summary(times) for name, times in samples.items()}


def _summary(samples: list) -> dict:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "stdev_ms": statistics.stdev(samples) if len(samples) > 1 else 0.0, "repeats": len(samples)}


def machine_description() -> dict:
    import numpy
    import onnxruntime
    import torch
    import tvm

    import slimgraph

    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "versions": {"slimgraph": slimgraph.__version__, "tvm": tvm.__version__, "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}}


def cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def write_results(name: str, data: dict) -> Path:
    """``bench/results/<name>-<date>.json``; a later run of the same day gets ``-run2``, ``-run3``, ...
    so that no recorded result is overwritten."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{time.strftime('%Y-%m-%d')}"
    path, run = RESULTS_DIR / f"{stem}.json", 1
    while path.exists():
        run += 1
        path = RESULTS_DIR / f"{stem}-run{run}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path

"""Backend half of ``slimgraph compile``: lower, build, export the library, write the weights."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import tvm

from slimgraph.backends.artifact import LIBRARY, WEIGHTS
from slimgraph.backends.build import build_executable, export_library
from slimgraph.backends.relax_lowering import lower_to_relax
from slimgraph.backends.targets import TargetSpec, resolve_target
from slimgraph.compiler.ir import Module
from slimgraph.compiler.weights_io import write_safetensors


@dataclass
class BuildResult:
    target: TargetSpec
    entries: dict
    timings: dict
    num_functions: int
    tvm_version: str
    sparse_weights: dict = None   # name -> stored bytes of weights kept in the sparse format
    tuning: dict | None = None    # kernels scheduled from the tuning database, and those that fell back


def build_artifact_files(module: Module, directory: Path, options, *, on_event=lambda k, p: None) -> BuildResult:
    """Write model.so and weights.safetensors for ``module`` into ``directory``."""
    spec = resolve_target(options.target, options.mcpu, gpu_arch=options.arch, fp16=options.fp16)
    timings = {}
    t0 = time.perf_counter()
    on_event("stage_start", {"stage": "lower", "detail": f"Relax for {spec.name}"})
    lowered = lower_to_relax(module)
    num_functions = len(lowered.ir_module.functions)
    timings["lower"] = time.perf_counter() - t0
    on_event("stage_end", {"stage": "lower"})
    t0 = time.perf_counter()
    on_event("stage_start", {"stage": "build", "detail": f"TVM {spec.describe()}"})
    tuned, tuning = _tuning_pass(options, spec, on_event)
    executable = build_executable(lowered, spec, schedule=options.schedule, tuned=tuned)
    if tuned is not None:
        for kind in ("matched", "fallback", "kept_default", "default_not_measured"):
            tuning[kind] = sorted(tuning.get(kind, []))
    export_library(executable, spec, str(directory / LIBRARY))
    timings["build"] = time.perf_counter() - t0
    on_event("stage_end", {"stage": "build"})
    t0 = time.perf_counter()
    used = sorted({w for sig in lowered.entries.values() for w in sig.weights})
    sparse = write_safetensors({name: module.weights[name].array for name in used}, directory / WEIGHTS, sparse=True)
    timings["write_weights"] = time.perf_counter() - t0
    entries = {name: {"inputs": sig.inputs, "weights": sig.weights, "outputs": sig.outputs}
               for name, sig in lowered.entries.items()}
    return BuildResult(spec, entries, timings, num_functions, tvm.__version__, sparse, tuning)


def _tuning_pass(options, spec: TargetSpec, on_event):
    """(pass applying the tuning database, its report) or (None, None) without --tuning-db. A
    database for another target or slimgraph version is ignored with a warning."""
    if options.tuning_db is None:
        return None, None
    from slimgraph.backends.tuning import TuningDatabase, tuned_schedules_pass

    db = TuningDatabase.open(options.tuning_db, spec, create=False)
    report = {"database": str(db.folder)}
    if not db.usable:
        report["warning"] = db.warning
        on_event("warning", {"text": f"--tuning-db: {db.warning}; default schedules are used"})
        return None, report
    return tuned_schedules_pass(db, report), report

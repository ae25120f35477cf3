"""Build a lowered Relax module into a TVM executable with slimgraph's default schedules.

TVM's generic CPU pipeline schedules nothing; :func:`build_executable` uses the pipeline of the
target's family (``backends.schedules.cpu`` for CPUs: parallel, vectorized, tiled kernels;
``backends.schedules.gpu`` for CUDA). TVM failures are caught and re-raised as
:class:`BackendError` with a short summary.
"""

from __future__ import annotations

import re

import tvm

from slimgraph.backends.relax_lowering import LoweredModule
from slimgraph.backends.targets import TargetSpec, family_of
from slimgraph.compiler.errors import BackendError


def _summarize_tvm_error(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    checks = [ln for ln in lines if re.search(r"Check failed|Error|error:", ln)]
    return (checks[-1] if checks else (lines[-1] if lines else type(exc).__name__))[:500]


def relax_pipeline(spec: TargetSpec, *, schedule: bool = True, tuned=None):
    return family_of(spec).relax_pipeline(spec, schedule, tuned)


def build_executable(lowered: LoweredModule, spec: TargetSpec, *, schedule: bool = True, tuned=None):
    """Compile to a ``tvm.runtime.Executable``; raises BackendError on any TVM failure."""
    target = spec.tvm_target()
    try:
        with target:
            return tvm.compile(lowered.ir_module, target=target, relax_pipeline=relax_pipeline(spec, schedule=schedule, tuned=tuned))
    except Exception as exc:  # TVM raises TVMError / InternalError / ValueError subclasses
        raise BackendError(f"TVM build for target {spec.describe()} failed: {_summarize_tvm_error(exc)}",
                           hint="this is a slimgraph bug: please report it with the --dump-ir output") from None


def export_library(executable, spec: TargetSpec, path: str) -> None:
    try:
        family_of(spec).export(executable, path)
    except Exception as exc:
        raise BackendError(f"exporting the compiled library to {path} failed: {_summarize_tvm_error(exc)}") from None

"""Build a lowered Relax module into a TVM executable with slimgraph's default schedules.

TVM's generic CPU pipeline schedules nothing; :func:`build_executable` uses the pipeline from
``backends.schedules.cpu`` that gives every fused kernel a parallel, vectorized, tiled schedule.
TVM failures are caught and re-raised as :class:`BackendError` with a short summary.
"""

from __future__ import annotations

import re

import tvm

from slimgraph.backends.relax_lowering import LoweredModule
from slimgraph.backends.targets import TargetSpec
from slimgraph.compiler.errors import BackendError


def _summarize_tvm_error(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    checks = [ln for ln in lines if re.search(r"Check failed|Error|error:", ln)]
    return (checks[-1] if checks else (lines[-1] if lines else type(exc).__name__))[:500]


def relax_pipeline(spec: TargetSpec, *, schedule: bool = True):
    target = spec.tvm_target()
    if not schedule:
        return tvm.relax.get_default_pipeline(target)
    from slimgraph.backends.schedules.cpu import build_pipeline

    return build_pipeline(target)


def build_executable(lowered: LoweredModule, spec: TargetSpec, *, schedule: bool = True):
    """Compile to a ``tvm.runtime.Executable``; raises BackendError on any TVM failure."""
    target = spec.tvm_target()
    try:
        with target:
            return tvm.compile(lowered.ir_module, target=target, relax_pipeline=relax_pipeline(spec, schedule=schedule))
    except Exception as exc:  # TVM raises TVMError / InternalError / ValueError subclasses
        raise BackendError(f"TVM build for target {spec.name} ({spec.mcpu}) failed: {_summarize_tvm_error(exc)}",
                           hint="this is a slimgraph bug: please report it with the --dump-ir output") from None


def export_library(executable, path: str) -> None:
    try:
        executable.export_library(path)
    except Exception as exc:
        raise BackendError(f"exporting the compiled library to {path} failed: {_summarize_tvm_error(exc)}") from None

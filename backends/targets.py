"""Compilation targets, looked up by name in a registry (``--target x86``).

A :class:`TargetSpec` records everything needed to rebuild the TVM target and to check, at load
time, that an artifact may run on the current machine.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from typing import Callable

import tvm

from slimgraph.compiler.errors import TargetError


@dataclass(frozen=True)
class TargetSpec:
    name: str            # slimgraph target name: x86, ...
    kind: str            # TVM target kind: llvm, cuda
    arch: str            # machine architecture the code runs on: x86_64, aarch64
    mcpu: str            # CPU model whose features the code uses
    num_cores: int

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": self.kind, "mcpu": self.mcpu, "num-cores": self.num_cores})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TargetSpec":
        return cls(**data)


TargetFactory = Callable[[str | None], TargetSpec]
TARGETS: dict[str, TargetFactory] = {}


def register_target(name: str):
    def deco(fn: TargetFactory) -> TargetFactory:
        TARGETS[name] = fn
        return fn

    return deco


def host_cpu() -> str:
    return tvm.target.codegen.llvm_get_system_cpu()


def _cpu_is_known(mcpu: str) -> bool:
    return bool(tvm.target.codegen.llvm_is_valid_cpu(mcpu, "x86_64-linux-gnu"))


def cpu_features(mcpu: str) -> set[str]:
    """LLVM's feature set of a CPU model (avx512f, fma, ...)."""
    return set(tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))


@register_target("x86")
def x86_target(mcpu: str | None = None) -> TargetSpec:
    """x86-64 CPU; features from the host CPU unless ``mcpu`` names another (e.g. skylake-avx512)."""
    chosen = mcpu or host_cpu()
    if not _cpu_is_known(chosen):
        raise TargetError(f"unknown x86 CPU {chosen!r} for --mcpu", hint="e.g. znver4, skylake-avx512, haswell")
    return TargetSpec("x86", "llvm", "x86_64", chosen, os.cpu_count() or 1)


def resolve_target(name: str, mcpu: str | None = None) -> TargetSpec:
    factory = TARGETS.get(name)
    if factory is None:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(sorted(TARGETS))}")
    return factory(mcpu)


def check_runnable_here(spec: TargetSpec, artifact: str) -> None:
    """Refuse an artifact built for another architecture, or for CPU features this CPU lacks
    (running AVX-512 code on an AVX2-only CPU would die with an illegal instruction)."""
    machine = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    if spec.arch != machine:
        raise TargetError(f"{artifact}: built for {spec.name} ({spec.arch}), but this machine is {machine}")
    if spec.kind == "llvm" and spec.mcpu != host_cpu():
        missing = sorted(cpu_features(spec.mcpu) - cpu_features(host_cpu()))
        if missing:
            raise TargetError(f"{artifact}: built for CPU {spec.mcpu}, whose features {', '.join(missing[:6])}"
                              f"{' ...' if len(missing) > 6 else ''} this CPU ({host_cpu()}) lacks",
                              hint=f"recompile with --mcpu {host_cpu()} (or an older CPU model)")

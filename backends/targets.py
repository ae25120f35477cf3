"""Compilation targets: a :class:`TargetSpec` (plain data, stored in the artifact's manifest) and,
for each target name, a :class:`TargetFamily` in a registry that knows how to build, export, check
and run code for it (``--target x86 | arm64 | cuda``).

A spec records everything needed to rebuild the TVM target and to check, at load time, that an
artifact may run on the current machine. The families live in their own modules
(``targets_cpu``, ``targets_cuda``) and register themselves here.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import tvm

from slimgraph.compiler.errors import TargetError


@dataclass(frozen=True)
class TargetSpec:
    name: str            # slimgraph target name: x86, arm64, cuda
    kind: str            # TVM target kind of the kernels: llvm, cuda
    arch: str            # machine architecture of the host code: x86_64, aarch64
    mcpu: str            # CPU model whose features the host code uses ("" = the architecture's baseline)
    num_cores: int
    mtriple: str = ""    # LLVM triple of the host code ("" = this machine's)
    mattr: tuple = ()    # LLVM features added to the CPU model's (+neon, +dotprod)
    gpu_arch: str = ""   # CUDA compute capability of the kernels (sm_90); "" for CPU targets
    fp16: bool = False   # float activations and weights computed in float16 (GPU targets)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mattr"] = list(self.mattr)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TargetSpec":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["mattr"] = tuple(values.get("mattr", ()))
        return cls(**values)

    def host_target(self) -> tvm.target.Target:
        """The LLVM target of the host (CPU) code."""
        config: dict = {"kind": "llvm", "num-cores": self.num_cores}
        if self.mcpu:
            config["mcpu"] = self.mcpu
        if self.mtriple:
            config["mtriple"] = self.mtriple
        if self.mattr:
            config["mattr"] = list(self.mattr)
        return tvm.target.Target(config)

    def tvm_target(self) -> tvm.target.Target:
        return family_of(self).tvm_target(self)

    def describe(self) -> str:
        what = self.gpu_arch or self.mcpu or self.arch
        return f"{self.name} ({what}{', fp16' if self.fp16 else ''})"


class TargetFamily(Protocol):
    """What slimgraph needs to know about one target name."""

    name: str

    def resolve(self, mcpu: str | None, gpu_arch: str | None, fp16: bool) -> TargetSpec:
        """The spec for these flags; raises TargetError for unknown CPUs/archs or missing tools."""

    def tvm_target(self, spec: TargetSpec) -> tvm.target.Target: ...

    def relax_pipeline(self, spec: TargetSpec, schedule: bool, tuned=None):
        """The Relax -> executable pipeline; ``tuned`` schedules kernels from a tuning database first."""

    def lowering_passes(self, spec: TargetSpec) -> list:
        """The pipeline's passes up to one unscheduled kernel per fused function (for tuning)."""

    def graph_passes(self, spec: TargetSpec) -> list:
        """slimgraph IR passes this target wants before fusion (weight layouts of its kernels)."""

    def default_schedule(self, func, spec: TargetSpec):
        """One kernel as the build schedules it without a tuning database (tuning's baseline)."""

    def export(self, executable, path: str) -> None:
        """Write the compiled library (machine code only) to ``path``."""

    def device(self, spec: TargetSpec):
        """The TVM device an artifact of this family runs on."""

    def check_runnable_here(self, spec: TargetSpec, artifact: str) -> None:
        """Raise TargetError if this machine cannot run code built for ``spec``."""


FAMILIES: dict[str, TargetFamily] = {}


def register_family(family: TargetFamily) -> TargetFamily:
    FAMILIES[family.name] = family
    return family


def _load_families() -> None:
    from slimgraph.backends import targets_cpu, targets_cuda  # noqa: F401  (they register themselves)


def family_of(spec_or_name) -> TargetFamily:
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.name
    _load_families()
    family = FAMILIES.get(name)
    if family is None:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(sorted(FAMILIES))}")
    return family


def resolve_target(name: str, mcpu: str | None = None, *, gpu_arch: str | None = None,
                   fp16: bool = False) -> TargetSpec:
    return family_of(name).resolve(mcpu, gpu_arch, fp16)


def machine_arch() -> str:
    """This machine's architecture as slimgraph names it (x86_64, aarch64)."""
    return platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")


def check_runnable_here(spec: TargetSpec, artifact: str) -> None:
    if spec.arch != machine_arch():
        raise TargetError(f"{artifact}: built for {spec.name} ({spec.arch}), but this machine is {machine_arch()}")
    family_of(spec).check_runnable_here(spec, artifact)

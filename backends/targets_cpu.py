"""CPU targets: ``x86`` (this machine's or a named x86-64 CPU) and ``arm64`` (aarch64 Linux with NEON,
cross-compiled here and linked with ``aarch64-linux-gnu-gcc``).

Both use slimgraph's CPU schedules (``backends.schedules.cpu``), whose vector width follows the
target: 16 float32 lanes on AVX-512, 4 on NEON. An ARM CPU model (``--mcpu cortex-a76``) brings its
LLVM features (dotprod, fullfp16, ...); those the kernels may use are recorded in the spec and
checked at load time against the running CPU's hardware capabilities (``AT_HWCAP``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import tvm

from slimgraph.backends.targets import TargetSpec, register_family
from slimgraph.compiler.errors import TargetError

ARM64_TRIPLE = "aarch64-linux-gnu"
ARM64_DEFAULT_CPU = "generic"
ARM64_DEFAULT_CORES = 4
ARM64_LINKER_ENV = "SLIMGRAPH_ARM64_CC"
ARM64_LINKER = "aarch64-linux-gnu-gcc"
# LLVM feature -> (auxv word, bit) of Linux's aarch64 hardware capabilities (asm/hwcap.h).
_AT_HWCAP, _AT_HWCAP2 = 16, 26
ARM64_HWCAPS = {"neon": (_AT_HWCAP, 1), "fullfp16": (_AT_HWCAP, 10), "dotprod": (_AT_HWCAP, 20),
                "sve": (_AT_HWCAP, 22), "i8mm": (_AT_HWCAP2, 13), "bf16": (_AT_HWCAP2, 14)}


def host_cpu() -> str:
    return tvm.target.codegen.llvm_get_system_cpu()


def cpu_features(mcpu: str, mtriple: str = "") -> set[str]:
    """LLVM's feature set of a CPU model (avx512f, fma, ... / neon, dotprod, ...)."""
    config = {"kind": "llvm", "mcpu": mcpu, **({"mtriple": mtriple} if mtriple else {})}
    return set(tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(config)))


def _no_gpu_flags(name: str, gpu_arch: str | None, fp16: bool) -> None:
    if gpu_arch:
        raise TargetError(f"--arch {gpu_arch} is for GPU targets; --target {name} takes --mcpu")
    if fp16:
        raise TargetError(f"--fp16 is for GPU targets; --target {name} computes in float32")


def cpu_pipeline(spec: TargetSpec, schedule: bool, tuned=None):
    target = spec.tvm_target()
    if not schedule:
        return tvm.relax.get_default_pipeline(target)
    from slimgraph.backends.schedules.cpu import build_pipeline

    return build_pipeline(target, tuned)


def cpu_default_schedule(func, spec: TargetSpec):
    from slimgraph.backends.schedules.cpu import schedule_prim_func

    return schedule_prim_func(func, spec.tvm_target())[0]


def cpu_lowering_passes(spec: TargetSpec) -> list:
    from slimgraph.backends.schedules.cpu import lowering_passes

    return lowering_passes(spec.tvm_target())


def cpu_graph_passes(spec: TargetSpec) -> list:
    """Float32 matmul weights as column panels as wide as the GEMM micro tile (``pack_weights``)."""
    from slimgraph.backends.schedules.cpu import panel_columns
    from slimgraph.passes.pack_weights import pack_weights_pass

    return [pack_weights_pass(panel_columns(spec.tvm_target()))]


class X86Family:
    """x86-64 CPUs; features from this machine's CPU unless ``--mcpu`` names another."""

    name = "x86"

    def resolve(self, mcpu, gpu_arch, fp16) -> TargetSpec:
        _no_gpu_flags(self.name, gpu_arch, fp16)
        chosen = mcpu or host_cpu()
        if not tvm.target.codegen.llvm_is_valid_cpu(chosen, "x86_64-linux-gnu"):
            raise TargetError(f"unknown x86 CPU {chosen!r} for --mcpu", hint="e.g. znver4, skylake-avx512, haswell")
        return TargetSpec("x86", "llvm", "x86_64", chosen, os.cpu_count() or 1)

    def tvm_target(self, spec):
        return spec.host_target()

    relax_pipeline = staticmethod(cpu_pipeline)
    lowering_passes = staticmethod(cpu_lowering_passes)
    graph_passes = staticmethod(cpu_graph_passes)
    default_schedule = staticmethod(cpu_default_schedule)

    def export(self, executable, path: str) -> None:
        executable.export_library(path)

    def device(self, spec):
        return tvm.cpu(0)

    def check_runnable_here(self, spec, artifact: str) -> None:
        """Refuse CPU features this CPU lacks (AVX-512 code on an AVX2-only CPU dies with an illegal
        instruction)."""
        here = host_cpu()
        if spec.mcpu == here:
            return
        missing = sorted(cpu_features(spec.mcpu) - cpu_features(here))
        if missing:
            raise TargetError(f"{artifact}: built for CPU {spec.mcpu}, whose features {', '.join(missing[:6])}"
                              f"{' ...' if len(missing) > 6 else ''} this CPU ({here}) lacks",
                              hint=f"recompile with --mcpu {here} (or an older CPU model)")


def arm64_linker() -> str:
    """The cross linker (``$SLIMGRAPH_ARM64_CC`` or ``aarch64-linux-gnu-gcc``), or TargetError."""
    name = os.environ.get(ARM64_LINKER_ENV, ARM64_LINKER)
    path = shutil.which(name)
    if path is None:
        raise TargetError(f"--target arm64 needs the cross linker {name}, which is not on PATH",
                          hint="install Debian/Ubuntu's gcc-aarch64-linux-gnu package "
                               f"(or set {ARM64_LINKER_ENV} to an aarch64 Linux gcc)")
    found = subprocess.run([path, "-print-file-name=crti.o"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(found):
        raise TargetError(f"the cross linker {name} finds no aarch64 C runtime (crti.o), so it cannot link",
                          hint="install Debian/Ubuntu's libc6-dev-arm64-cross package")
    return path


class Arm64Family:
    """aarch64 Linux with NEON; ``--mcpu`` an ARM core (cortex-a72, cortex-a76, neoverse-n1, ...)."""

    name = "arm64"

    def resolve(self, mcpu, gpu_arch, fp16) -> TargetSpec:
        _no_gpu_flags(self.name, gpu_arch, fp16)
        chosen = mcpu or ARM64_DEFAULT_CPU
        if not tvm.target.codegen.llvm_is_valid_cpu(chosen, ARM64_TRIPLE):
            raise TargetError(f"unknown ARM CPU {chosen!r} for --mcpu",
                              hint="e.g. cortex-a72, cortex-a76, neoverse-n1, cortex-a55")
        arm64_linker()
        features = cpu_features(chosen, ARM64_TRIPLE) | {"neon"}
        mattr = tuple(f"+{f}" for f in sorted(features & set(ARM64_HWCAPS)))
        return TargetSpec("arm64", "llvm", "aarch64", chosen, ARM64_DEFAULT_CORES, ARM64_TRIPLE, mattr)

    def tvm_target(self, spec):
        return spec.host_target()

    relax_pipeline = staticmethod(cpu_pipeline)
    lowering_passes = staticmethod(cpu_lowering_passes)
    graph_passes = staticmethod(cpu_graph_passes)
    default_schedule = staticmethod(cpu_default_schedule)

    def export(self, executable, path: str) -> None:
        from tvm.support import cc

        executable.export_library(path, fcompile=cc.cross_compiler(arm64_linker()))

    def device(self, spec):
        return tvm.cpu(0)

    def check_runnable_here(self, spec, artifact: str) -> None:
        missing = [f.lstrip("+") for f in spec.mattr if not _has_hwcap(f.lstrip("+"))]
        if missing:
            raise TargetError(f"{artifact}: built for ARM CPU {spec.mcpu} with {', '.join(missing)}, "
                              "which this CPU lacks", hint="recompile with an older --mcpu (e.g. cortex-a72)")


def _has_hwcap(feature: str) -> bool:
    word, bit = ARM64_HWCAPS[feature]
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    return bool(getauxval(word) >> bit & 1)


register_family(X86Family())
register_family(Arm64Family())

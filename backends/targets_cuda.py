"""The ``cuda`` target: NVIDIA GPUs, built on any x86-64 machine with nvcc (no GPU needed).

The compute capability comes from ``--arch sm_90`` or, when omitted, from the GPU of this machine
(``nvidia-smi``). Kernels are compiled by nvcc into a fatbin inside ``model.so``
(``TVM_CUDA_COMPILE_MODE=nvcc``), so the artifact holds machine code and runs on the GPU machine
with TVM's runtime alone. The host code is generic x86-64.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import tvm

from slimgraph.backends.cuda_runtime import ensure_cuda_runtime
from slimgraph.backends.targets import TargetSpec, machine_arch, register_family
from slimgraph.compiler.errors import TargetError

ARCH_PATTERN = re.compile(r"sm_(\d)(\d)a?")
NVCC_ENV = "SLIMGRAPH_NVCC"
NVCC_CANDIDATES = ("nvcc", "/usr/local/cuda/bin/nvcc")


def find_nvcc() -> str:
    """``$SLIMGRAPH_NVCC``, else nvcc on PATH or in /usr/local/cuda/bin; TargetError if none."""
    candidates = (os.environ[NVCC_ENV],) if os.environ.get(NVCC_ENV) else NVCC_CANDIDATES
    for candidate in candidates:
        path = shutil.which(candidate)
        if path:
            return path
    raise TargetError(f"--target cuda needs nvcc (the CUDA toolkit's compiler); tried {', '.join(candidates)}",
                      hint=f"install the CUDA toolkit, put its bin/ on PATH, or set {NVCC_ENV}")


def detect_gpu_arch() -> str | None:
    """``sm_XY`` of this machine's first GPU, or None without a GPU / nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"sm_{out[0].replace('.', '')}" if out else None


def _capability(arch: str) -> tuple[int, int]:
    match = ARCH_PATTERN.fullmatch(arch)
    if match is None:
        raise TargetError(f"unknown CUDA architecture {arch!r} for --arch", hint="e.g. sm_80 (A100), sm_89, sm_90 (H100)")
    return int(match.group(1)), int(match.group(2))


def _use_nvcc() -> None:
    """Builds compile kernels with nvcc into a fatbin (TVM's default, NVRTC, needs extra Python
    packages), with TVM's CUDA runtime loaded (see ``cuda_runtime``)."""
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    nvcc_dir = os.path.dirname(find_nvcc())
    if nvcc_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = nvcc_dir + os.pathsep + os.environ.get("PATH", "")
    ensure_cuda_runtime()


FATBIN_MAGIC = (0xBA55ED50).to_bytes(4, "little")
CUDA_SOURCE_MARK = b'extern "C" __global__'


def check_machine_code(library: str) -> None:
    """Refuse a library whose kernels were embedded as CUDA source (compiled at load time, which
    fails on a machine without nvcc) instead of an nvcc fatbin."""
    data = open(library, "rb").read()
    if CUDA_SOURCE_MARK in data or FATBIN_MAGIC not in data:
        raise TargetError(f"{library}: the CUDA kernels were embedded as source, not compiled to machine code",
                          hint="TVM's CUDA runtime was not loaded at build time; this is a slimgraph bug")


WIDE_OUTPUTS_PER_ROW = 2   # N >= 2 K: a wide product (a merged gate/up projection, an LM head)
SHORT_ROWS = 1024          # K <= 1024: short rows (every product of SmolLM2-135M but its down projection)
ROW_WARP_ROWS = 256        # K a multiple of this: the words of a row split into whole steps of a warp's lanes


def reads_words_transposed(rows: int, outputs: int) -> bool:
    """Whether a quantized ``[K, N]`` weight is stored transposed for CUDA, K contiguous per output:
    for slimgraph's ``RowGEMV`` wherever a warp's lanes split the words of a row into whole steps
    (``K % 256 == 0``: 8-, 16- or 32-bit codes, 32 lanes, at least one word each); else for DLight's
    ``GEMV`` on wide products and short rows, where it beat ``ColumnGEMV`` over ``[K, N]`` words inside
    the one-token steps (``bench/results/stage3-cuda-2026-12-07-run6-word-layouts``)."""
    return rows % ROW_WARP_ROWS == 0 or outputs >= WIDE_OUTPUTS_PER_ROW * rows or rows <= SHORT_ROWS


class CudaFamily:
    """NVIDIA GPUs through TVM's CUDA backend with DLight schedules."""

    name = "cuda"

    def resolve(self, mcpu, gpu_arch, fp16) -> TargetSpec:
        if mcpu:
            raise TargetError(f"--mcpu {mcpu} is for CPU targets; --target cuda takes --arch (e.g. sm_90)")
        arch = gpu_arch or detect_gpu_arch()
        if arch is None:
            raise TargetError("--target cuda: no GPU found on this machine to take the architecture from",
                              hint="pass --arch, e.g. --arch sm_90 for H100/H200, sm_80 for A100")
        _capability(arch)
        _use_nvcc()
        return TargetSpec("cuda", "cuda", machine_arch(), "", 1, gpu_arch=arch, fp16=fp16)

    def tvm_target(self, spec):
        return tvm.target.Target({"kind": "cuda", "arch": spec.gpu_arch}, host=spec.host_target())

    def relax_pipeline(self, spec, schedule: bool, tuned=None):
        from slimgraph.backends.schedules.gpu import build_pipeline

        return build_pipeline(spec.tvm_target(), schedule=schedule, tuned=tuned)

    def lowering_passes(self, spec) -> list:
        from slimgraph.backends.schedules.gpu import lowering_passes

        return lowering_passes(spec.tvm_target())

    def graph_passes(self, spec) -> list:
        """Quantized words transposed where the one-token products read them faster so (``pack_weights``)."""
        from slimgraph.compiler.types import DType
        from slimgraph.passes.pack_weights import pack_weights_pass

        return [pack_weights_pass(1, (DType.u32,), select=reads_words_transposed, group_params=True,
                                  description="quantized words (and their scales and zero points) of products "
                                              "with K % 256 == 0, wide products (N >= 2K) and short rows "
                                              "(K <= 1024) stored transposed, K contiguous per output")]

    def default_schedule(self, func, spec):
        from slimgraph.backends.schedules.gpu import default_rules, schedule_kernel

        target = spec.tvm_target()
        with target:
            return schedule_kernel(func, target, default_rules())

    def export(self, executable, path: str) -> None:
        executable.export_library(path)
        check_machine_code(path)

    def device(self, spec):
        ensure_cuda_runtime()
        return tvm.cuda(0)

    def check_runnable_here(self, spec, artifact: str) -> None:
        if not ensure_cuda_runtime():
            raise TargetError(f"{artifact}: built for CUDA ({spec.gpu_arch}), but no CUDA driver loads on this machine")
        device = tvm.cuda(0)
        if not device.exist:
            raise TargetError(f"{artifact}: built for CUDA ({spec.gpu_arch}), but this machine has no GPU")
        have = tuple(int(p) for p in device.compute_version.split("."))
        need = _capability(spec.gpu_arch)
        if have[0] != need[0] or have < need:
            raise TargetError(f"{artifact}: kernels are for {spec.gpu_arch}; this GPU ({device.device_name}) is "
                              f"sm_{have[0]}{have[1]}", hint=f"recompile with --arch sm_{have[0]}{have[1]}")


register_family(CudaFamily())

"""A GPU schedule's TIR run on the CPU (the serial twin of a scheduled CUDA kernel), and the CUDA
source a CUDA build makes of a kernel.

Thread-bound loops become serial loops and shared or register buffers plain ones, so the twin
computes, one thread after the other, exactly what the schedule's blocks compute (layouts,
caches, split reductions and all); it builds for LLVM and runs here, where no GPU is. What it does
not cover is what only the CUDA lowering adds: the warp shuffles of cross-thread reductions and
the barriers between shared-memory stages (the GPU-marked tests run those).
"""

from __future__ import annotations

import re

import numpy as np
import tvm

_THREAD_LOOP = re.compile(r'T\.thread_binding\(([^,]+), thread="[^"]+"(?:, annotations=\{[^}]*\})?\)')


def serial_twin(scheduled: tvm.tirx.PrimFunc):
    """The scheduled kernel ``scheduled`` with its thread loops serial, built for the CPU."""
    text = _THREAD_LOOP.sub(r"T.serial(\1)", scheduled.script())
    text = re.sub(r', scope="(shared|local)"', "", text).replace('"tirx.is_scheduled": True, ', "")
    twin = tvm.script.from_source(text).with_attr("global_symbol", "main")
    return tvm.tirx.build(tvm.IRModule({"main": twin}), target="llvm")


def run_twin(scheduled: tvm.tirx.PrimFunc, inputs: list[np.ndarray], output: np.ndarray) -> np.ndarray:
    """The output the serial twin of ``scheduled`` writes for ``inputs`` (``output``: its shape and dtype)."""
    dev = tvm.cpu()
    result = tvm.runtime.tensor(np.zeros_like(output), dev)
    serial_twin(scheduled)(*[tvm.runtime.tensor(a, dev) for a in inputs], result)
    return result.numpy()


def scheduled_cuda(func: tvm.tirx.PrimFunc, target) -> tuple:
    """(scheduled kernel, the rule that scheduled it, its CUDA source) under the default GPU rules."""
    from slimgraph.backends.schedules import gpu

    with target:
        scheduled, rule = gpu.schedule_prim_func(func, target, gpu.default_rules())
        built = tvm.tirx.build(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "gemv")}), target=target)
    return scheduled, rule, (built.imports[0] if built.imports else built).inspect_source()

"""An RMS norm computed inside the factored one-token product that reads it (gpu_norm_prologue):
where the CUDA lowering merges the two kernels, and what RowGEMV's schedule of the merged kernel
computes."""

from __future__ import annotations

import numpy as np
import pytest

from slimgraph.backends.schedules.gpu_factored_gemv import ROW_STAGE
from slimgraph.backends.targets import resolve_target
from slimgraph.compiler import ops
from slimgraph.compiler.ir import FunctionBuilder, Module
from slimgraph.compiler.ops.quantization import dequantize_reference
from slimgraph.compiler.types import DType
from test_gpu_row_gemv import needs_nvcc


def _cuda():
    return resolve_target("cuda", None, gpu_arch="sm_90", fp16=True).tvm_target()


def _kernels(module, factored_rows: bool = True):
    from slimgraph.backends.schedules import gpu

    return gpu.lowered_kernels(module, _cuda(), factored_rows=factored_rows)


def _norm_sums(func) -> int:
    """Reductions of the kernel ``func`` to one value (an RMS norm's sum of squares)."""
    return sum(1 for line in func.script().splitlines() if "T.axis.remap(\"SSR\"" in line)


def test_rms_norm_merges_into_the_factored_product_that_reads_it():
    from slimgraph.models.kernels import int4_product

    (merged,) = _kernels(int4_product(2048, 256, transposed=True, norm=True))
    assert ROW_STAGE in merged.script() and _norm_sums(merged) == 1
    separate = _kernels(int4_product(2048, 256, transposed=True, norm=True), factored_rows=False)
    assert len(separate) == 2


def _norm_read_twice() -> Module:
    """The norm of ``x`` feeds a factored product and is an output of its own too."""
    from slimgraph.models.kernels import int4_product

    product = int4_product(2048, 256, transposed=True, norm=True).functions["main"]
    b = FunctionBuilder("main", {})
    for param in product.params:
        b.param(param.name, param.type)
    names = {}
    for node in product.nodes:
        names[node.name] = b.add(node.op, [names.get(i, i) for i in node.inputs], dict(node.attrs.items()))
    normed = next(names[n.name] for n in product.nodes if n.op is ops.CAST and n.attrs.get("dtype") is DType.f16)
    b.output(names[product.outputs[0]], normed)
    return Module({"main": b.build()}, {})


@pytest.mark.parametrize("module,kernels", [
    (lambda: __import__("slimgraph.models.kernels", fromlist=["int4_product"]).int4_product(
        576, 256, transposed=True, norm=True), 2),          # 72 words a row: no factored kernel to merge into
    (_norm_read_twice, 2),                                # the norm has a second reader
])
def test_rms_norm_stays_a_kernel_of_its_own_where_it_cannot_merge(module, kernels):
    found = _kernels(module())
    assert len(found) == kernels and not any(_norm_sums(f) and ROW_STAGE in f.script() for f in found)


def _normed_product(rows: int, outputs: int, seed: int):
    """Inputs (in the merged kernel's order: g, x, words, scales, zeros) and the float16 result of
    ``f16(rms_norm(x) g) @ W``."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2 ** 32, (rows // 8, outputs), dtype=np.uint32)
    scales = (rng.random((rows // 128, outputs)) * 0.02 + 0.001).astype(np.float16)
    zeros = rng.integers(0, 16, (rows // 128, outputs)).astype(np.float16)
    x = rng.standard_normal((1, 1, rows)).astype(np.float16)
    g = rng.uniform(0.5, 1.5, rows).astype(np.float16)
    x32 = x.astype(np.float32)
    normed = (x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + 1e-5) * g.astype(np.float32)).astype(np.float16)
    weight = dequantize_reference(words, scales, zeros, bits=4, group_size=128, rows=rows)
    reference = (normed.astype(np.float32)[0] @ weight).astype(np.float16)
    return [g, x, np.ascontiguousarray(words.T)[:, :, None], scales, zeros], reference


@needs_nvcc
@pytest.mark.parametrize("rows,outputs", [(2048, 512), (5632, 256), (768, 128)])
def test_row_gemv_sums_the_norm_in_every_block_and_computes_the_normed_product(rows, outputs):
    """The merged kernel takes RowGEMV: one block-wide sum of squares (warp shuffles, then the
    warps' sums through shared memory) before the stages; run as its serial twin on the CPU it
    gives the product of the float16-rounded norm."""
    from gpu_twin import run_twin, scheduled_cuda

    from slimgraph.models.kernels import int4_product

    (func,) = _kernels(int4_product(rows, outputs, transposed=True, norm=True))
    scheduled, rule, source = scheduled_cuda(func, _cuda())
    assert rule == "RowGEMV"
    assert source.count("__global__ void") == 2 and source.count("red_buf_staging") >= 1 and "rsqrtf" in source
    inputs, reference = _normed_product(rows, outputs, rows)
    got = run_twin(scheduled, inputs, reference[None])
    np.testing.assert_allclose(got[0].astype(np.float32), reference.astype(np.float32), rtol=2e-3, atol=2e-3)

"""The factored one-token product for CUDA (gpu_factored_gemv): its arithmetic against the dequantized
weights, where the CUDA lowering puts it, and how RowGEMV schedules it."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import te

from slimgraph.backends.schedules.gpu_factored_gemv import ROW_STAGE, chunk_words, factored_row_product
from slimgraph.backends.targets import resolve_target
from slimgraph.compiler.ops.quantization import dequantize_reference
from slimgraph.passes.quant_format import pack_codes
from test_gpu_row_gemv import needs_nvcc


def _cuda():
    return resolve_target("cuda", None, gpu_arch="sm_90", fp16=True).tvm_target()


@pytest.mark.parametrize("bits,words_per_chunk,symmetric", [
    (4, 2, False), (4, 1, False), (4, 2, True), (8, 1, False), (2, 2, False)])
def test_factored_product_equals_the_product_with_the_dequantized_weights(bits, words_per_chunk, symmetric):
    """Built for the CPU (no schedule), the factored compute gives ``x @ ((q - z) s)`` to float32
    rounding, for codes in every position of a word (the in-place masks of both halves)."""
    rows, columns, group = 512, 48, 64
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (rows, columns))
    words = pack_codes(codes, bits)
    scales = rng.uniform(0.01, 0.1, (rows // group, columns)).astype(np.float32)
    zeros = None if symmetric else rng.uniform(0, (1 << bits) - 1, (rows // group, columns)).astype(np.float32)
    x = rng.standard_normal((1, 1, rows)).astype(np.float32)
    reference = x[0] @ dequantize_reference(words, scales, zeros, bits=bits, group_size=group, rows=rows)

    holders = [te.placeholder(a.shape, str(a.dtype)) for a in (x, words, scales) + (() if zeros is None else (zeros,))]
    y = factored_row_product(*holders, bits=bits, group=group, words_per_chunk=words_per_chunk)
    built = tvm.tirx.build(te.create_prim_func([*holders, y]), target="llvm")
    out = tvm.runtime.tensor(np.zeros((1, 1, columns), np.float32), tvm.cpu())
    built(*[tvm.runtime.tensor(a, tvm.cpu()) for a in (x, words, scales) + (() if zeros is None else (zeros,))], out)
    np.testing.assert_allclose(out.numpy()[0], reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("rows,group,bits,expected", [
    (2048, 128, 4, 2),     # 8-byte chunks: 16 codes in one group, 4 warp steps
    (768, 128, 4, 1),      # 96 words: whole warp steps of single words only
    (576, 128, 4, None),   # 72 words: no whole warp step
    (2048, 8, 4, 1),       # groups of 8 rows: one word a chunk
    (16384, 128, 4, None),  # xq and xs (68 KB) exceed a thread block's shared memory
])
def test_chunks_share_a_group_fill_warp_steps_and_fit_shared_memory(rows, group, bits, expected):
    assert chunk_words(rows, group, bits) == expected


def _stages(func) -> dict:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    return {str(sch.get(b).annotations[ROW_STAGE]): sch.get(b).name_hint for b in blocks
            if ROW_STAGE in sch.get(b).annotations}


@pytest.mark.parametrize("rows,transposed,factored", [
    (2048, True, True),      # words stored [N, K / 8]: factored
    (2048, False, False),    # words stored [K / 8, N]: the column schedules read the dequantize form
    (576, True, False),      # 72 words: no whole warp step
])
def test_cuda_lowering_factors_one_token_products_over_transposed_words_where_asked(rows, transposed, factored):
    from slimgraph.backends.schedules import gpu
    from slimgraph.models.kernels import int4_product

    (func,) = gpu.lowered_kernels(int4_product(rows, 256, transposed=transposed), _cuda(), factored_rows=True)
    assert (_stages(func) == {"codes": "xq", "sums": "xs"}) == factored
    (kept,) = gpu.lowered_kernels(int4_product(rows, 256, transposed=transposed), _cuda())   # as builds lower it
    assert not _stages(kept)


@needs_nvcc
@pytest.mark.parametrize("rows,outputs,residual", [(2048, 512, True), (5632, 256, False), (768, 128, True)])
def test_row_gemv_stages_the_factored_activations_in_shared_memory(rows, outputs, residual):
    """RowGEMV computes xq and xs once per block in shared memory, reads xq four floats at a time
    from lane-interleaved runs into a few registers, and converts no code with an integer-to-float
    conversion."""
    from gpu_twin import scheduled_cuda

    from slimgraph.backends.schedules import gpu
    from slimgraph.models.kernels import int4_product

    target = _cuda()
    module = int4_product(rows, outputs, transposed=True, residual=residual)
    (func,) = gpu.lowered_kernels(module, target, factored_rows=True)
    _, rule, source = scheduled_cuda(func, target)
    assert rule == "RowGEMV"
    assert "__shared__ alignas(64) float4 xq_shared_ptr" in source and "__shared__ alignas(64) float xs_shared_ptr" in source
    # lane l reads float4 number l (+ a multiple of the warp's run): consecutive lanes, consecutive banks
    reads = re.findall(r"\*\(float4\*\)\(xq_shared_local_ptr[^=]*= (xq_shared_ptr\[[^;]*\]);", source)
    assert reads and all(re.fullmatch(r"xq_shared_ptr\[\(+\(int\)threadIdx\.x\)( \+ \d+\))?\]", r) for r in reads), reads
    registers = {name: int(size) for name, size in re.findall(r"alignas\(64\) \w+ (\w+_local_ptr)\[(\d+)\];", source)}
    words = 2 if rows % 512 == 0 else 1
    assert registers["xq_shared_local_ptr"] == 8 * words and registers["p0_local_ptr"] == words, registers
    assert "(float)(p0_local" not in source and "1258291200" in source
    assert "__shfl_down_sync" in source


@pytest.mark.parametrize("rows,outputs,factored", [
    (2048, 512, True), (5632, 256, True), (768, 128, True), (256, 64, True),
    (2048, 512, False), (768, 128, False)])
def test_row_gemv_schedules_compute_the_product_run_serially_on_the_cpu(rows, outputs, factored):
    """RowGEMV's schedule of the factored kernel (chunks of 2 and 1 words, a masked stage for 256
    rows) and of the dequantize form, its threads run one after the other on the CPU (the serial
    twin), gives the float16 product and residual add of the dequantized weights."""
    from gpu_twin import run_twin

    from slimgraph.backends.schedules import gpu
    from slimgraph.models.kernels import int4_product

    target = _cuda()
    module = int4_product(rows, outputs, transposed=True, residual=True)
    (func,) = gpu.lowered_kernels(module, target, factored_rows=factored)
    with target:
        scheduled, rule = gpu.schedule_prim_func(func, target, gpu.default_rules())
    assert rule == "RowGEMV"
    rng = np.random.default_rng(rows)
    words = rng.integers(0, 2 ** 32, (rows // 8, outputs), dtype=np.uint32)
    scales = (rng.random((rows // 128, outputs)) * 0.02 + 0.001).astype(np.float16)
    zeros = rng.integers(0, 16, (rows // 128, outputs)).astype(np.float16)
    x = rng.standard_normal((1, 1, rows)).astype(np.float16)
    residual = rng.standard_normal((1, 1, outputs)).astype(np.float16)
    weight = dequantize_reference(words, scales, zeros, bits=4, group_size=128, rows=rows)
    reference = (x.astype(np.float32)[0] @ weight).astype(np.float16) + residual[0]
    got = run_twin(scheduled, [np.ascontiguousarray(words.T)[:, :, None], scales, zeros, x, residual], residual)
    np.testing.assert_allclose(got[0].astype(np.float32), reference.astype(np.float32), rtol=2e-3, atol=2e-3)

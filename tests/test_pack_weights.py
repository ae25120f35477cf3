"""pack_weights: float32 matmul weights stored as column panels, read back per reader.

Golden IR after the pass, exact equality with the interpreter, the panel layout itself, weights
left alone when a reader needs the [K, N] layout, fusion taking the read-back chain into the
reader's kernel, and the x86 pipeline running the pass with the target's panel width.
"""

from __future__ import annotations

import numpy as np
import pytest

from golden_util import GraphMaker, assert_golden, llama_block
from slimgraph.compiler import interpreter, ops
from slimgraph.compiler.ir import FunctionKind
from slimgraph.compiler.passmanager import get_pass, make_sample_inputs
from slimgraph.compiler.printer import print_module
from slimgraph.compiler.types import DType, TensorType
from slimgraph.compiler.verifier import verify
from slimgraph.passes.pack_weights import SUFFIX, pack_weights, to_panels


def folded_block():
    return get_pass("fold_constants").run(llama_block()).module


def test_panels_golden_exact_outputs_and_no_mutation():
    module = folded_block()
    before = print_module(module)
    result, changed, stats = pack_weights(module, 4)
    assert print_module(module) == before
    verify(result)
    assert changed and stats["weights_packed"] == 6          # gate, up [8, 16] and down [16, 8] of 2 layers
    assert_golden("pack_weights/llama_block", print_module(result))
    inputs = make_sample_inputs(module)
    for ref, got in zip(interpreter.run(module, inputs), interpreter.run(result, inputs)):
        np.testing.assert_array_equal(ref, got)               # a layout change: not one bit differs
    again, changed_again, _ = pack_weights(result, 4)
    assert not changed_again and print_module(again) == print_module(result)


def test_panel_layout():
    w = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)
    panels = to_panels(w, 4)
    assert panels.shape == (2, 3, 4)
    np.testing.assert_array_equal(panels[1, 2], w[2, 4:8])
    module = folded_block()
    result = pack_weights(module, 4).module
    for name, weight in module.weights.items():
        if f"{name}{SUFFIX}" in result.weights:
            np.testing.assert_array_equal(result.weights[f"{name}{SUFFIX}"].array, to_panels(weight.array, 4))
            assert name not in result.weights


def test_weight_with_another_reader_keeps_its_layout():
    g = GraphMaker()
    x = g.b.param("x", TensorType(DType.f32, (1, "T", 8)))
    w = g.weight("w", (8, 16))
    y = g(ops.MATMUL, x, w, name="y")
    module = g.module(y, g(ops.MUL, w, g.const(2.0), name="w2"))
    result, changed, _ = pack_weights(module, 4)
    assert not changed and "w" in result.weights


def test_each_reader_reads_the_panels_inside_its_own_kernel():
    module = pack_weights(folded_block(), 4).module
    fused = get_pass("fuse").run(module).module
    readers = 0
    for fn in fused.functions.values():
        if fn.kind is not FunctionKind.FUSED:
            continue
        reads_panels = any(ref.endswith(SUFFIX) for n in fn.nodes for ref in n.inputs if ref.startswith("@"))
        uses = {n.op for n in fn.nodes}
        if reads_panels or any(p.type.rank == 3 and p.type.shape[2] == 4 for p in fn.params):
            readers += 1
            assert uses & {ops.MATMUL, ops.TAKE}, f"@{fn.name} materializes the [K, N] weight: {uses}"
    assert readers >= 3


def test_x86_pipeline_packs_with_the_targets_panel_width():
    from slimgraph.backends.schedules.cpu import panel_columns
    from slimgraph.backends.targets import resolve_target
    from slimgraph.compiler.driver import CompileOptions, load_model, optimize

    columns = panel_columns(resolve_target("x86").tvm_target())
    module, _ = load_model("tiny-llama")
    report = optimize(module, CompileOptions(target="x86"))
    names = [r.name for r in report.records]
    assert names.index("pack_weights") == names.index("fuse") - 1
    packed = [w for n, w in report.module.weights.items() if n.endswith(SUFFIX)]
    assert packed and all(w.type.rank == 3 and w.type.shape[2] == columns for w in packed)


@pytest.mark.parametrize("columns", [4, 1])
def test_quantized_words_become_panels_and_outputs_stay_exact(columns):
    """The packed words of int4 weights (u32 [K/8, N], read by dequantize) are stored as panels like
    float weights (one column wide: transposed, as for CUDA); their scales and zero points keep their
    layout; not one output bit changes."""
    from slimgraph.compiler.recipe import QuantizeSettings, Recipe
    from slimgraph.passes._compress import CompressionContext
    from slimgraph.passes.quantize import quantize_pass

    context = CompressionContext(Recipe({"quantize": QuantizeSettings("rtn", 4, 8)}), None)
    quantized = quantize_pass(context).run(folded_block()).module
    result, changed, stats = pack_weights(quantized, columns)
    verify(result)
    packed = {name[: -len(SUFFIX)] for name in result.weights if name.endswith(SUFFIX)}
    assert changed and packed and all(name.endswith(".qweight") for name in packed)
    assert not any(name.endswith((".scales", ".zeros")) for name in packed)
    for name in packed:
        words = quantized.weights[name]
        assert words.type.dtype is DType.u32 and name not in result.weights
        np.testing.assert_array_equal(result.weights[f"{name}{SUFFIX}"].array, to_panels(words.array, columns))
    inputs = make_sample_inputs(quantized)
    for ref, got in zip(interpreter.run(quantized, inputs), interpreter.run(result, inputs)):
        np.testing.assert_array_equal(ref, got)


def test_dtypes_and_the_matrix_filter_choose_what_is_packed():
    """Only weights of the given dtypes are packed, and with ``select`` only those whose matrix [K, N]
    it accepts (K: the rows ``dequantize`` unpacks the words to); the others keep their layout and
    every output stays exact."""
    from slimgraph.compiler.recipe import QuantizeSettings, Recipe
    from slimgraph.passes._compress import CompressionContext
    from slimgraph.passes.quantize import quantize_pass

    context = CompressionContext(Recipe({"quantize": QuantizeSettings("rtn", 4, 8)}), None)
    quantized = quantize_pass(context).run(folded_block()).module
    rows = {node.inputs[0][1:]: node.attrs["rows"] for fn in quantized.entries for node in fn.nodes
            if node.op is ops.DEQUANTIZE and node.inputs[0].startswith("@")}
    wide = {name for name, k in rows.items() if quantized.weights[name].type.shape[1] >= 2 * k}
    assert wide and wide != set(rows), "the block has both kinds of product"
    result = pack_weights(quantized, 1, (DType.u32,), select=lambda k, n: n >= 2 * k).module
    assert {name[: -len(SUFFIX)] for name in result.weights if name.endswith(SUFFIX)} == wide
    assert all(w.type.dtype is DType.u32 for n, w in result.weights.items() if n.endswith(SUFFIX))
    inputs = make_sample_inputs(quantized)
    for ref, got in zip(interpreter.run(quantized, inputs), interpreter.run(result, inputs)):
        np.testing.assert_array_equal(ref, got)


def test_scales_and_zero_points_follow_their_packed_words_and_fuse_into_the_product():
    """With ``group_params`` the scales and zero points of packed words are stored as panels too (the
    scales of words left alone by ``select`` keep their layout), every output stays exact, and fusion
    still puts each dequantize -- now reading three views of weights -- into its product's kernel."""
    from slimgraph.compiler.recipe import QuantizeSettings, Recipe
    from slimgraph.passes._compress import CompressionContext
    from slimgraph.passes.fusion import fuse
    from slimgraph.passes.quantize import quantize_pass

    context = CompressionContext(Recipe({"quantize": QuantizeSettings("rtn", 4, 8)}), None)
    quantized = quantize_pass(context).run(folded_block()).module
    wide = lambda k, n: n >= 2 * k  # noqa: E731
    words_only = pack_weights(quantized, 1, (DType.u32,), select=wide).module
    result = pack_weights(quantized, 1, (DType.u32,), select=wide, group_params=True).module
    packed = {name[: -len(SUFFIX)] for name in result.weights if name.endswith(SUFFIX)}
    words = {name[: -len(SUFFIX)] for name in words_only.weights if name.endswith(SUFFIX)}
    prefixes = {name.rsplit(".", 1)[0] for name in words}
    assert packed == words | {f"{p}.{kind}" for p in prefixes for kind in ("scales", "zeros")}
    for name in packed - words:
        expected = to_panels(quantized.weights[name].array, 1)
        np.testing.assert_array_equal(result.weights[f"{name}{SUFFIX}"].array, expected)
    assert any(name.endswith(".scales") for name in result.weights), "unselected products keep their scales"
    inputs = make_sample_inputs(quantized)
    for ref, got in zip(interpreter.run(quantized, inputs), interpreter.run(result, inputs)):
        np.testing.assert_array_equal(ref, got)
    fused = fuse(result).module
    kernels = [f for f in fused.functions.values() if f.kind is FunctionKind.FUSED]
    products = [f for f in kernels if any(n.op is ops.MATMUL for n in f.nodes)]
    alone = [f.name for f in kernels if {n.op for n in f.nodes} & {ops.DEQUANTIZE}
             and not {n.op for n in f.nodes} & {ops.MATMUL, ops.TAKE}]   # a gathered row dequantizes alone
    assert not alone and sum(1 for f in products for n in f.nodes if n.op is ops.DEQUANTIZE) >= len(words)

"""Each optimization pass on small hand-built graphs: golden IR after the pass, numerical
equivalence with the interpreter, idempotence, and that the input module is never mutated."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from golden_util import (
    GraphMaker, assert_golden, assert_same_outputs, causal_attention, conv_batch_norm, layer_norm_primitives,
    layout_noise, llama_block, softmax_primitives,
)
from slimgraph.compiler import interpreter, ops
from slimgraph.compiler.ir import FunctionKind, Module
from slimgraph.compiler.passmanager import compare_outputs, get_pass, make_sample_inputs
from slimgraph.compiler.printer import parse_module, print_module
from slimgraph.compiler.types import DType, TensorType
from slimgraph.compiler.verifier import verify

GRAPHS = {
    "llama_block": llama_block,
    "causal_attention": causal_attention,
    "causal_attention_symbolic": lambda: causal_attention("T"),
    "layer_norm": layer_norm_primitives,
    "softmax": softmax_primitives,
    "conv_bn": conv_batch_norm,
    "layout_noise": layout_noise,
}
PASSES = ("fold_constants", "simplify", "cse", "dce", "fuse")


def run_pass(name: str, module: Module):
    return get_pass(name).run(module)


def weight_snapshot(module: Module) -> dict:
    return {name: w.array.copy() for name, w in module.weights.items()}


@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("pass_name", PASSES)
def test_pass_golden_numerics_idempotence(pass_name, graph):
    module = GRAPHS[graph]()
    text_before, arrays_before = print_module(module), weight_snapshot(module)
    result, changed, stats = run_pass(pass_name, module)
    # the input is untouched (text and weight data)
    assert print_module(module) == text_before
    for name, array in arrays_before.items():
        np.testing.assert_array_equal(module.weights[name].array, array)
    verify(result)
    text = print_module(result)
    assert changed == (text != text_before)
    assert all(isinstance(v, int) for v in stats.values())
    assert_golden(f"{pass_name}/{graph}", text)
    assert_same_outputs(module, result)
    again, changed_again, _ = run_pass(pass_name, result)
    assert not changed_again and print_module(again) == text
    assert parse_module(text).functions.keys() == result.functions.keys()


# ----------------------------------------------------------------------------- constant folding
def ops_of(module: Module, function: str = "main") -> list:
    return [n.op for n in module.functions[function].nodes]


def test_static_causal_mask_folds_completely():
    result = run_pass("fold_constants", causal_attention(5)).module
    remaining = set(ops_of(result))
    assert not remaining & {ops.ARANGE, ops.CUMSUM, ops.WHERE, ops.LE, ops.BROADCAST_TO, ops.CAST}
    mask = [w for w in result.weights if w.startswith("fold.")]
    assert len(mask) == 1 and result.weights[mask[0]].type == TensorType(DType.f32, (1, 1, 5, 5))
    assert np.isneginf(result.weights[mask[0]].array[0, 0, 0, 1])


def test_symbolic_causal_mask_is_left_alone():
    result, changed, _ = run_pass("fold_constants", causal_attention("T"))
    assert not changed and ops.CUMSUM in ops_of(result)


def test_fold_names_are_deterministic():
    first = print_module(run_pass("fold_constants", causal_attention(5)).module)
    assert first == print_module(run_pass("fold_constants", causal_attention(5)).module)


def test_huge_broadcast_is_not_folded_but_small_uniform_becomes_constant():
    g = GraphMaker()
    x = g.b.param("x", TensorType(DType.f32, (64, 1024, 1024)))
    big = g(ops.BROADCAST_TO, g(ops.CAST, g.const(2.0, DType.i64), dtype=DType.f32), shape=[64, 1024, 1024])
    small = g(ops.BROADCAST_TO, g.const(3.0), shape=[4])
    module = g.module(g(ops.ADD, x, big), g(ops.ADD, small, small))
    result, changed, stats = run_pass("fold_constants", module)
    assert changed and not result.weights
    nodes = result.main.node_map()
    assert nodes[result.main.outputs[0]].op is ops.ADD
    assert any(n.op is ops.BROADCAST_TO and n.type.shape == (64, 1024, 1024) for n in nodes.values())
    folded = nodes[result.main.outputs[1]]
    assert folded.op is ops.CONSTANT and folded.attrs["value"] == 6.0 and folded.type.shape == (4,)


def test_lone_scalar_constants_stay_ops():
    g = GraphMaker()
    x = g.b.param("x", TensorType(DType.f32, (3,)))
    module = g.module(g(ops.MUL, x, g.const(2.0)))
    _, changed, _ = run_pass("fold_constants", module)
    assert not changed


# ----------------------------------------------------------------------------- simplify
def test_weight_transpose_is_pretransposed_once():
    result = run_pass("simplify", llama_block(layers=1)).module
    assert "embed.T" in result.weights and "l0.gate.T" in result.weights
    wt = result.weights["l0.gate.T"].array
    assert wt.flags.c_contiguous and wt.shape == (8, 16)
    np.testing.assert_array_equal(wt, result.weights["l0.gate"].array.T)
    transposes = [n for f in result.functions.values() for n in f.nodes if n.op is ops.TRANSPOSE]
    assert all(not i.startswith("@") for n in transposes for i in n.inputs)  # no weight transposed at run time


@pytest.mark.parametrize("exponent", [2.0, 3.0, 4.0])
def test_integer_powers_become_products(exponent):
    """pow(x, n) -> products of x: exact for negative x (GPT-2's GELU cubes negative values)."""
    g = GraphMaker()
    x = g.b.param("x", TensorType(DType.f32, (5,)))
    module = g.module(g(ops.POW, x, g.const(exponent)))
    result = run_pass("simplify", module).module
    assert not any(n.op is ops.POW for n in result.main.nodes)
    values = np.array([-2.5, -1.0, 0.0, 0.5, 3.0], np.float32)
    np.testing.assert_allclose(interpreter.run(result, [values])[0], np.power(values, exponent), rtol=1e-6)


def test_tied_embedding_is_stored_once():
    """The lookup table and the LM head's transposed copy hold the same numbers: keep one."""
    before = llama_block(layers=1)
    after = run_pass("dce", run_pass("simplify", before).module).module
    assert "embed" not in after.weights and "embed.T" in after.weights
    assert after.weight_bytes() == before.weight_bytes()  # pre-transposed, yet not stored twice
    inputs = make_sample_inputs(before)
    assert compare_outputs(interpreter.run(before, inputs)[0], interpreter.run(after, inputs)[0]).ok


@pytest.mark.parametrize("graph, op", [
    (llama_block, ops.RMS_NORM), (layer_norm_primitives, ops.LAYER_NORM), (softmax_primitives, ops.SOFTMAX),
])
def test_normalizations_are_recognized(graph, op):
    result = run_pass("dce", run_pass("simplify", graph()).module).module
    assert op in ops_of(result)
    assert not set(ops_of(result)) & {ops.RSQRT, ops.SQRT, ops.EXP, ops.MEAN}


def test_layer_norm_absorbs_weight_and_bias():
    result = run_pass("simplify", layer_norm_primitives()).module
    ln = result.main.node_map()["ln"]
    assert ln.op is ops.LAYER_NORM and ln.inputs[1:] == ("@ln.weight", "@ln.bias")


def test_batch_norm_folds_into_conv():
    result = run_pass("dce", run_pass("simplify", conv_batch_norm()).module).module
    assert ops_of(result) == [ops.CONV2D, ops.RELU]
    assert sorted(result.weights) == ["conv.weight.bn", "conv.weight.bn_bias"]


def test_batch_norm_folds_into_conv_without_bias():
    """The usual Conv2d(bias=False) + BatchNorm2d: the folded conv gains a bias."""
    from golden_util import GraphMaker

    g = GraphMaker()
    x = g.b.param("x", TensorType(DType.f32, (1, 3, 8, 8)))
    c = g(ops.CONV2D, x, g.weight("conv.weight", (4, 3, 3, 3)), padding=[1, 1, 1, 1])
    var = np.abs(g.rng.standard_normal(4)).astype(np.float32) + 0.5
    bn = g(ops.BATCH_NORM, c, g.weight("bn.mean", (4,)), g.weight("bn.var", (4,), var),
           g.weight("bn.weight", (4,)), g.weight("bn.bias", (4,)), name="out")
    before = g.module(bn)
    after = run_pass("dce", run_pass("simplify", before).module).module
    assert ops_of(after) == [ops.CONV2D] and len(after.main.nodes[0].inputs) == 3
    inputs = make_sample_inputs(before)
    assert compare_outputs(interpreter.run(before, inputs)[0], interpreter.run(after, inputs)[0]).ok


# ----------------------------------------------------------------------------- cse / dce
def test_cse_merges_commutative_and_identical_weights():
    result, _, stats = run_pass("cse", layout_noise())
    assert stats["weights_merged"] == 1 and "w2" not in result.weights
    assert stats["nodes_merged"] >= 2   # add(s, x) == add(x, s), the repeated constants


def test_dce_drops_unused_functions_and_weights():
    module = run_pass("fuse", llama_block(layers=1)).module
    extra = dict(module.functions)
    extra["unused_fn"] = module.functions["fused_softmax"].__class__(
        "unused_fn", module.functions["fused_softmax"].params, module.functions["fused_softmax"].nodes,
        module.functions["fused_softmax"].outputs, FunctionKind.FUSED)
    module = module.with_functions(extra)
    result, changed, stats = run_pass("dce", module)
    assert changed and "unused_fn" not in result.functions and stats["functions_removed"] == 1


# ----------------------------------------------------------------------------- fusion
def fused_invariants(module: Module) -> None:
    for fn in module.functions.values():
        if fn.kind is FunctionKind.FUSED:
            assert len(fn.outputs) == 1 and not fn.weight_refs()
            anchors = [n for n in fn.nodes if n.op.category in (
                ops.OpCategory.CONTRACTION, ops.OpCategory.REDUCTION, ops.OpCategory.NORMALIZATION)]
            assert len(anchors) <= 1, fn.name
    for fn in module.entries:
        for n in fn.nodes:
            assert n.op in (ops.CALL, ops.RESHAPE) or n.op.category is ops.OpCategory.SOURCE, n


def test_identical_layers_share_fused_functions():
    two = run_pass("fuse", run_pass("simplify", llama_block(layers=2)).module).module
    six = run_pass("fuse", run_pass("simplify", llama_block(layers=6)).module).module
    fused_invariants(two)
    fused_invariants(six)
    assert sorted(two.functions) == sorted(six.functions)
    assert {"fused_matmul_silu_mul", "fused_matmul_add", "fused_rms_norm"} <= set(six.functions)


def test_fusion_rules_on_attention_and_swiglu():
    module = run_pass("fuse", run_pass("fold_constants", causal_attention(5)).module).module
    fused_invariants(module)
    body = module.functions[module.main.nodes[0].callee]
    assert [n.op for n in body.nodes] == [ops.TRANSPOSE, ops.MATMUL, ops.CONSTANT, ops.MUL, ops.ADD]


def rotary_scores(T: int = 1) -> Module:
    """q and k views of one projection, each read by a rotate-half (slice, neg, concat) and by the
    rotary add, then the score product; a softmax and a second product read another view."""
    g = GraphMaker(seed=2)
    qk = g.b.param("qk", TensorType(DType.f32, (1, T, 16)))
    heads = []
    for start in (0, 8):
        part = g(ops.SLICE, qk, axis=2, start=start, end=start + 8)
        t = g(ops.TRANSPOSE, g(ops.RESHAPE, part, shape=[1, T, 2, 4]), perm=[0, 2, 1, 3])
        half = g(ops.CONCAT, g(ops.NEG, g(ops.SLICE, t, axis=3, start=2, end=4)), g(ops.SLICE, t, axis=3, end=2),
                 axis=3)
        heads.append(g(ops.ADD, g(ops.MUL, t, g.weight(f"cos{start}", (T, 4))),
                       g(ops.MUL, half, g.weight(f"sin{start}", (T, 4)))))
    scores = g(ops.MATMUL, heads[0], g(ops.TRANSPOSE, heads[1], perm=[0, 1, 3, 2]), name="scores")
    view = g(ops.TRANSPOSE, g(ops.RESHAPE, qk, shape=[1, T, 2, 8]), perm=[0, 2, 1, 3], name="view")
    probs = g(ops.SOFTMAX, g(ops.ADD, scores, g(ops.SLICE, view, axis=3, end=T)), axis=-1, name="probs")
    return g.module(g(ops.MATMUL, probs, view, name="out"))


def test_views_read_by_several_kernels_are_recomputed_in_each():
    """One token: the q and k views (each read by the rotate-half and by the rotary add) become
    reads of the score product. A slice read by the scores' epilogue stays a kernel (an epilogue reads computed
    values only); the view it slices is recomputed there and in the last product's prologue."""
    before = rotary_scores()
    module = run_pass("fuse", before).module
    fused_invariants(module)
    bodies = [module.functions[n.callee] for n in module.main.nodes if n.op is ops.CALL]
    assert [[n.op for n in b.nodes if n.op.category is not ops.OpCategory.LAYOUT] for b in bodies] == [
        [], [ops.NEG, ops.MUL, ops.MUL, ops.ADD, ops.NEG, ops.MUL, ops.MUL, ops.ADD, ops.MATMUL, ops.ADD],
        [ops.SOFTMAX], [ops.MATMUL]]
    assert [n.op for n in bodies[0].nodes] == [ops.RESHAPE, ops.TRANSPOSE, ops.SLICE]
    assert [n.op for n in bodies[3].nodes] == [ops.RESHAPE, ops.TRANSPOSE, ops.MATMUL]
    assert sum(n.op is ops.CONCAT for n in bodies[1].nodes) == 2
    assert_same_outputs(before, module)


def test_views_a_prompt_product_reads_many_times_stay_kernels():
    """Six tokens: the last product reads each element of the value view six times, so the view is
    not recomputed in it; it stays one kernel that the slice kernel and the product both read."""
    before = rotary_scores(T=6)
    module = run_pass("fuse", before).module
    fused_invariants(module)
    bodies = [[n.op for n in module.functions[n.callee].nodes] for n in module.main.nodes if n.op is ops.CALL]
    assert bodies[0] == [ops.RESHAPE, ops.TRANSPOSE] and bodies[1] == [ops.SLICE] and bodies[-1] == [ops.MATMUL]
    assert_same_outputs(before, module)

_UNARY = [ops.EXP, ops.TANH, ops.NEG, ops.SIGMOID, ops.ABS]
_BINARY = [ops.ADD, ops.MUL, ops.SUB, ops.MAXIMUM]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 3), st.integers(0, 30), st.integers(0, 30)),
                min_size=1, max_size=12), st.integers(1, 3))
def test_random_elementwise_graphs_fuse_and_cse(steps, n_outputs):
    """Random DAGs of elementwise ops (with repeats): fuse and cse keep values and invariants."""
    g = GraphMaker()
    values = [g.b.param("a", TensorType(DType.f32, (2, 3))), g.b.param("b", TensorType(DType.f32, (3,)))]
    for kind, op_index, i, j in steps:
        x, y = values[i % len(values)], values[j % len(values)]
        if kind < 4:
            values.append(g(_UNARY[(kind + op_index) % len(_UNARY)], x))
        else:
            values.append(g(_BINARY[op_index], x, y))
    module = g.module(*values[-n_outputs:])
    inputs = make_sample_inputs(module, seed=1)
    for name in ("cse", "fuse", "dce"):
        result = run_pass(name, module).module
        verify(result)
        assert_same_outputs(module, result, inputs)
        module = result
    fused_invariants(module)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["transpose", "reshape", "cast", "mul1", "add0"]),
                          st.permutations([0, 1, 2])), min_size=1, max_size=8))
def test_random_layout_chains_simplify_exactly(chain):
    """Chains of transposes, reshapes, no-op casts and neutral elements: simplify keeps values."""
    g = GraphMaker()
    x = g.b.param("x", TensorType(DType.f32, (2, 3, 4)))
    value = x
    for kind, perm in chain:
        shape = g.b.type_of(value).shape
        if kind == "transpose":
            value = g(ops.TRANSPOSE, value, perm=list(perm))
        elif kind == "reshape":
            value = g(ops.RESHAPE, value, shape=[shape[i] for i in perm])
        elif kind == "cast":
            value = g(ops.CAST, value, dtype=DType.f32)
        else:
            value = g(ops.MUL if kind == "mul1" else ops.ADD, value, g.const(1.0 if kind == "mul1" else 0.0))
    module = g.module(g(ops.EXP, value))
    result = run_pass("dce", run_pass("simplify", module).module).module
    verify(result)
    assert_same_outputs(module, result)
    assert not {ops.CAST, ops.MUL, ops.ADD} & set(ops_of(result))


def test_entries_share_fused_functions():
    module = run_pass("simplify", llama_block(layers=1)).module
    main = module.main
    decode = main.__class__("decode", main.params, main.nodes, main.outputs, main.kind)
    both = module.with_function(decode)
    fused = run_pass("fuse", both).module
    fused_invariants(fused)
    calls = lambda name: [n.callee for n in fused.functions[name].nodes if n.op is ops.CALL]  # noqa: E731
    assert calls("main") == calls("decode")
    assert_same_outputs(both, fused)


def test_simplify_turns_outer_product_matmul_into_mul():
    from slimgraph.compiler.ir import FunctionBuilder

    b = FunctionBuilder("main", {})
    a = b.param("a", TensorType(DType.f32, (1, 32, 1)))
    p = b.param("p", TensorType(DType.f32, (1, 1, "T")))
    b.output(b.add(ops.MATMUL, [a, p]))
    module = Module({"main": b.build()}, {})
    result, changed, stats = get_pass("simplify").run(module)
    assert changed and stats == {"outer_product": 1}
    assert [n.op for n in result.main.nodes] == [ops.MUL]
    rng = np.random.default_rng(0)
    inputs = {"a": rng.standard_normal((1, 32, 1)).astype(np.float32),
              "p": rng.standard_normal((1, 1, 5)).astype(np.float32)}
    np.testing.assert_allclose(interpreter.run(result, inputs)[0], interpreter.run(module, inputs)[0], rtol=1e-6)


def test_hf_causal_mask_folds_away_with_static_shapes():
    """Hugging Face's mask code (arange, cumsum over bool, gathers) depends only on shapes: with T
    fixed, constant folding removes all of it; with T symbolic it stays (and is computed at run time)."""
    from slimgraph.compiler.passmanager import run_pipeline
    from slimgraph.compiler.specialize import specialize
    from slimgraph.models.registry import load_module

    shape_ops = {ops.CUMSUM, ops.ARANGE, ops.GATHER_ELEMENTS}
    symbolic = load_module("tiny-llama")
    assert shape_ops & set(ops_of(symbolic))
    static = run_pipeline(specialize(symbolic, {"T": 8})).module
    assert not shape_ops & {n.op for f in static.functions.values() for n in f.nodes}

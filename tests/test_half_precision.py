"""The float16 pass: golden IR, outputs within float16 rounding of the float32 module, float32 kept
where it accumulates, the interface unchanged, fill values clamped, idempotence, no mutation."""

from __future__ import annotations

import numpy as np
import pytest

from golden_util import GraphMaker, assert_golden, causal_attention, llama_block
from slimgraph.compiler import interpreter, ops
from slimgraph.compiler.errors import CompressionError
from slimgraph.compiler.ir import Weight
from slimgraph.compiler.passmanager import compare_outputs, get_pass, make_sample_inputs, run_pipeline
from slimgraph.compiler.printer import print_module
from slimgraph.compiler.types import DType, TensorType
from slimgraph.compiler.verifier import verify

CLEANUP = ["fold_constants", "simplify", "cse", "dce", "simplify"]


def half(module):
    return get_pass("half_precision").run(module)


def cleaned(module):
    return run_pipeline(module, CLEANUP).module


@pytest.mark.parametrize("name,graph", [("llama_block", lambda: llama_block(layers=1)),
                                        ("causal_attention", lambda: causal_attention("T"))])
def test_golden_and_numerics(name, graph):
    module = cleaned(graph())
    before = print_module(module)
    result = half(module)
    assert result.changed and print_module(module) == before        # input untouched
    verify(result.module)
    assert_golden(f"half_precision/{name}", print_module(result.module))
    inputs = make_sample_inputs(module, seed=0, symbol_value=6)
    for ref, got in zip(interpreter.run(module, inputs), interpreter.run(result.module, inputs)):
        assert got.dtype == ref.dtype == np.float32
        assert compare_outputs(ref, got).cosine > 0.9999
        assert np.abs(got - ref).max() <= 5e-3 * max(np.abs(ref).max(), 1.0)


def test_float32_is_kept_where_it_accumulates():
    module = half(cleaned(llama_block(layers=1))).module
    fn = module.main
    for node in fn.nodes:
        if node.op is ops.MATMUL:
            assert node.attrs["out_dtype"] is DType.f32 and node.type.dtype is DType.f32
            assert all(fn.value_types(module)[i].dtype is DType.f16 for i in node.inputs)
        if node.op.category in (ops.OpCategory.REDUCTION, ops.OpCategory.NORMALIZATION):
            assert node.type.dtype is DType.f32
    assert all(w.type.dtype is not DType.f32 for w in module.weights.values())
    assert [p.type for p in fn.params] == [p.type for p in llama_block(layers=1).main.params]
    assert module.main.output_types()[0].dtype is DType.f32


def test_idempotent():
    once = half(cleaned(llama_block(layers=1))).module
    again = half(once)
    assert not again.changed and print_module(again.module) == print_module(once)


def test_mask_fill_values_are_clamped_not_infinite():
    """BERT's mask: (1 - mask) * finfo(f32).min. In float16 the fill would round to -inf and
    0 * -inf = NaN for every visible token; clamped to -65504 it stays 0."""
    g = GraphMaker()
    x = g.b.param("x", TensorType(DType.f32, (2, 4)))
    keep = g.b.param("keep", TensorType(DType.f32, (2, 4)))
    fill = g.const(float(np.finfo(np.float32).min))
    masked = g(ops.ADD, x, g(ops.MUL, g(ops.SUB, g.const(1.0), keep), fill))
    module = g.module(g(ops.SOFTMAX, masked, name="probs"))
    inputs = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32),
              "keep": np.array([[1, 1, 0, 1], [1, 0, 0, 1]], np.float32)}
    got = interpreter.run(half(module).module, inputs)[0]
    want = interpreter.run(module, inputs)[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_weight_beyond_float16_range_is_an_error_naming_it():
    module = cleaned(llama_block(layers=1))
    name = next(n for n, w in module.weights.items() if w.array.size > 16)
    big = module.weights[name].array.copy()
    big.flat[0] = 1e6
    with pytest.raises(CompressionError, match=name):
        half(module.with_weights({**module.weights, name: Weight(big)}))

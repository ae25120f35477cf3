"""8-bit activation codes (``dynamic_quantize``): the op's arithmetic, the quantize pass putting it
before each quantized product (``activations = "int8"``), and the recipe's checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from golden_util import llama_block
from slimgraph.compiler import interpreter, ops
from slimgraph.compiler.errors import CompressionOptionError
from slimgraph.compiler.ir import FunctionBuilder
from slimgraph.compiler.ops.quantization import dynamic_quantize_reference
from slimgraph.compiler.passmanager import compare_outputs, make_sample_inputs, run_pipeline
from slimgraph.compiler.recipe import QuantizeSettings, Recipe, recipe_from_flags
from slimgraph.compiler.types import DType, TensorType
from slimgraph.passes._compress import CompressionContext
from slimgraph.passes.quantize import quantize_pass

ROWS = hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64, 96])),
                  elements=st.floats(-1e4, 1e4, width=32))


@settings(max_examples=60, deadline=None)
@given(ROWS)
def test_values_are_codes_times_the_block_scale(x):
    out = dynamic_quantize_reference(x, bits=8, block=32)
    blocks, got = x.reshape(x.shape[0], -1, 32), out.reshape(x.shape[0], -1, 32)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    codes = np.divide(got, scale, out=np.zeros_like(got), where=scale > 0)
    assert np.all(np.abs(codes - np.rint(codes)) < 1e-3) and np.all(np.abs(codes) <= 127.001)
    assert np.all(np.abs(got - blocks) <= scale / 2 * (1 + 1e-5) + 1e-30)   # round to nearest
    assert np.array_equal(got[scale[..., 0] == 0], np.zeros_like(got[scale[..., 0] == 0]))


@settings(max_examples=60, deadline=None)
@given(ROWS)
def test_quantizing_twice_changes_nothing(x):
    once = dynamic_quantize_reference(x, bits=8, block=32)
    twice = dynamic_quantize_reference(once, bits=8, block=32)
    np.testing.assert_allclose(twice, once, rtol=1e-6, atol=0)


def test_the_block_peak_keeps_its_value_and_blocks_are_independent():
    x = np.concatenate([np.linspace(-3, 3, 32), np.full(32, 1e-3), np.zeros(32)]).astype(np.float32)[None]
    out = dynamic_quantize_reference(x, bits=8, block=32)
    assert out[0, 0] == np.float32(-3) and out[0, 31] == np.float32(3)
    np.testing.assert_allclose(out[0, 32:64], 1e-3, rtol=1e-6)     # a small block keeps its own scale
    assert not out[0, 64:].any()


@pytest.mark.parametrize("attrs,words", [({"block": 40}, "blocks of 40"), ({"bits": 4, "block": 32}, "bits must be 8")])
def test_bad_attributes_are_refused(attrs, words):
    b = FunctionBuilder("main", {})
    x = b.param("x", TensorType(DType.f32, (1, "T", 96)))
    with pytest.raises(ValueError, match=words):
        b.add(ops.DYNAMIC_QUANTIZE, [x], attrs)


def quantized(module, **kwargs):
    context = CompressionContext(Recipe({"quantize": QuantizeSettings("rtn", 4, 16, **kwargs)}), None)
    return quantize_pass(context).run(module)


def test_each_quantized_product_reads_codes_of_its_input():
    module = run_pipeline(llama_block(layers=1, D=64, F=96), ["fold_constants", "simplify", "cse", "dce"]).module
    result = quantized(module, activations="int8")
    nodes = result.module.main.node_map()
    products = [n for n in result.module.main.nodes if n.op is ops.MATMUL and nodes.get(n.inputs[1])
                and nodes[n.inputs[1]].op is ops.DEQUANTIZE]
    assert products and all(nodes[p.inputs[0]].op is ops.DYNAMIC_QUANTIZE for p in products)
    assert {nodes[p.inputs[0]].attrs["block"] for p in products} == {32}
    assert all(row["activations"] == "int8, block 32" for row in result.stats["layers"])
    inputs = make_sample_inputs(module, seed=0, symbol_value=5)
    weights_only = quantized(module).module
    want, got = interpreter.run(weights_only, inputs)[0], interpreter.run(result.module, inputs)[0]
    assert compare_outputs(want, got).cosine > 0.999 and not np.array_equal(want, got)


def test_layers_whose_inputs_are_not_whole_blocks_keep_float_inputs():
    module = run_pipeline(llama_block(layers=1, D=64, F=96), ["fold_constants", "simplify", "cse", "dce"]).module
    result = quantized(module, activations="int8", activation_block=64)      # D = 64 fits, F = 96 does not
    rows = {row["layer"]: row["activations"] for row in result.stats["layers"]}
    assert any(value == "int8, block 64" for value in rows.values())
    assert any("not a multiple of block 64" in value and "K=96" in value for value in rows.values())
    codes = [n for n in result.module.main.nodes if n.op is ops.DYNAMIC_QUANTIZE]
    assert len(codes) == sum(value == "int8, block 64" for value in rows.values())


@pytest.mark.parametrize("kwargs,words", [({"activations": "int4"}, "--quantize-activations"),
                                          ({"activation_block": 2}, "activation_block")])
def test_bad_activation_settings_are_refused(kwargs, words):
    with pytest.raises(CompressionOptionError, match=words):
        QuantizeSettings(**kwargs)


def test_activation_codes_need_quantized_weights():
    with pytest.raises(CompressionOptionError, match="--quantize-activations needs"):
        recipe_from_flags(activations="int8")
    assert recipe_from_flags(quantize="int4", activations="int8").steps["quantize"].activations == "int8"

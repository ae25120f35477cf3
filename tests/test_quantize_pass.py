"""The quantize pass: golden IR, equality with the numpy quantizers, honest ``changed``, packed
storage, the tied-embedding gather, ragged groups, and TVM kernels (dequantize fused into the
matmul) matching the reference interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from golden_util import assert_golden, llama_block
from slimgraph.compiler import interpreter, ops
from slimgraph.compiler.errors import CalibrationError, NonFiniteWeightError, RecipeLayerError
from slimgraph.compiler.ir import Module, Weight
from slimgraph.compiler.passmanager import compare_outputs, make_sample_inputs, run_pipeline
from slimgraph.compiler.printer import print_module
from slimgraph.compiler.recipe import LayerRule, QuantizeSettings, Recipe
from slimgraph.compiler.verifier import verify
from slimgraph.passes._compress import CompressionContext
from slimgraph.passes._linear import find_linear_layers
from slimgraph.passes.compression import compression_passes
from slimgraph.passes.quant_format import QuantSpec
from slimgraph.passes.quantize import quantize_pass
from slimgraph.passes.quantizers import quantize_rtn

CLEANUP = ["fold_constants", "simplify", "cse", "dce"]


def cleaned(**kwargs) -> Module:
    return run_pipeline(llama_block(**kwargs), CLEANUP).module


def batches(module: Module, count: int = 3) -> list[dict]:
    return [make_sample_inputs(module, seed=s, symbol_value=12) for s in range(count)]


def quantize(module: Module, settings: QuantizeSettings, *, rules=(), calibrated=True):
    data = batches(module) if calibrated else None
    context = CompressionContext(Recipe({"quantize": settings}, tuple(rules)),
                                 (lambda: data) if calibrated else None)
    return quantize_pass(context).run(module)


def fake_quantized(module: Module, spec: QuantSpec) -> Module:
    """The module with every linear weight replaced by its RTN-dequantized float matrix."""
    weights = dict(module.weights)
    for layer in find_linear_layers(module):
        weights[layer.weight] = Weight(quantize_rtn(module.weights[layer.weight].array, spec).dequantize())
    return module.with_weights(weights)


def test_golden_rtn_int4_with_tied_embedding():
    module = cleaned(layers=1, D=32, F=64)
    result = quantize(module, QuantizeSettings("rtn", 4, 16), calibrated=False)
    assert result.changed
    verify(result.module)
    assert_golden("quantize/rtn_int4_g16", print_module(result.module))


@pytest.mark.parametrize("bits,group,symmetric", [(4, 16, False), (3, 16, True), (8, None, True)])
def test_rtn_pass_equals_numpy_quantizer(bits, group, symmetric):
    module = cleaned(layers=2, D=32, F=64)
    settings = QuantizeSettings("rtn", bits, group, symmetric)
    result = quantize(module, settings, calibrated=False)
    inputs = make_sample_inputs(module, seed=4, symbol_value=9)
    got = interpreter.run(result.module, inputs)[0]
    want = interpreter.run(fake_quantized(module, QuantSpec(bits, group, symmetric)), inputs)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, interpreter.run(module, inputs)[0], atol=1e-6)  # it did quantize


def test_weights_are_packed_and_second_run_changes_nothing():
    module = cleaned(layers=1, D=32, F=64)
    result = quantize(module, QuantizeSettings("rtn", 4, 16), calibrated=False)
    words = [w for name, w in result.module.weights.items() if name.endswith(".qweight")]
    assert words and all(w.type.dtype.value == "u32" for w in words)
    down = result.module.weights["l0.down.T.qweight"]
    assert down.type.shape == (64 // 8, 32)                 # 8 int4 codes per uint32 word along K
    assert result.stats["bytes_after"] * 5 < result.stats["bytes_before"]
    again = quantize(result.module, QuantizeSettings("rtn", 4, 16), calibrated=False)
    assert not again.changed and again.module is result.module
    assert all(not any(i == "@embed.T" for i in n.inputs) for n in result.module.main.nodes)


def test_tied_embedding_gathers_packed_columns():
    module = cleaned(layers=1, D=32, F=64)
    result = quantize(module, QuantizeSettings("rtn", 4, 16), calibrated=False)
    takes = [n for n in result.module.main.nodes if n.op is ops.TAKE]
    assert takes and all(n.inputs[0].startswith("@embed.T.") for n in takes)
    dequantized = [n for n in result.module.main.nodes if n.op is ops.DEQUANTIZE and n.inputs[0] in
                   {t.name for t in takes}]
    assert len(dequantized) == 1


def test_ragged_last_group_is_reported():
    module = cleaned(layers=1, D=48, F=64)
    result = quantize(module, QuantizeSettings("rtn", 4, 32), calibrated=False)
    rows = {r["layer"]: r for r in result.stats["layers"]}
    assert "last group has 16 rows" in rows["l0.gate"]["fallback"]
    assert "fallback" not in rows["l0.down"]
    assert result.module.weights["l0.gate.T.scales"].type.shape == (2, 64)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_beat_rtn_on_their_own_objective(method):
    module = cleaned(layers=2, D=64, F=128)
    rtn = quantize(module, QuantizeSettings("rtn", 3, 16))
    better = quantize(module, QuantizeSettings(method, 3, 16))
    verify(better.module)
    sqnr = lambda res: np.mean([r["sqnr_db"] for r in res.stats["layers"]])  # noqa: E731
    assert sqnr(better) > sqnr(rtn) + 0.5
    if method == "awq":
        assert any(n.op is ops.MUL and n.name.endswith("_awq_input") for n in better.module.main.nodes)


def test_per_layer_rules_and_errors():
    module = cleaned(layers=1, D=32, F=64)
    rules = (LayerRule("l0.down", {"quantize": {"bits": 8, "group_size": 0}}), LayerRule("embed", {"quantize": False}))
    result = quantize(module, QuantizeSettings("rtn", 4, 16), rules=rules, calibrated=False)
    rows = {r["layer"]: r for r in result.stats["layers"]}
    assert rows["l0.down"]["bits"] == 8 and rows["l0.down"]["group_size"] == 64
    assert rows["l0.gate"]["bits"] == 4 and "embed" not in rows
    with pytest.raises(CalibrationError, match="calibration"):
        quantize(module, QuantizeSettings("gptq", 4, 16), calibrated=False)
    bad = Recipe({"quantize": QuantizeSettings()}, (LayerRule("model.nothing.*", {"quantize": False}),))
    check = compression_passes(CompressionContext(bad))[0]
    with pytest.raises(RecipeLayerError, match="model.nothing"):
        check.run(module)


def test_nan_weight_is_named():
    module = cleaned(layers=1, D=32, F=64)
    weights = dict(module.weights)
    broken = np.array(weights["l0.up.T"].array)
    broken[3, 5] = np.nan
    weights["l0.up.T"] = Weight(broken)
    with pytest.raises(NonFiniteWeightError, match="l0.up.T"):
        quantize(module.with_weights(weights), QuantizeSettings("rtn", 4, 16), calibrated=False)


@pytest.mark.parametrize("bits,group,symmetric,method", [(4, 16, False, "rtn"), (3, 32, True, "rtn"),
                                                         (8, None, True, "rtn"), (4, 16, False, "awq")])
def test_tvm_dequantize_kernels_match_interpreter(tmp_path, bits, group, symmetric, method):
    import slimgraph
    from slimgraph.compiler.driver import CompileOptions, compile_model

    module = cleaned(layers=1, D=64, F=128)
    quantized = quantize(module, QuantizeSettings(method, bits, group, symmetric)).module
    out = compile_model(quantized, tmp_path / "q", CompileOptions())
    model = slimgraph.load(out)
    graph = (out / "graph.ir").read_text()
    float_matrices = [line for line in graph.splitlines() if line.startswith("weight @") and ": f32[" in line
                      and sum(int(d) > 1 for d in line.split(": f32[")[1].split("]")[0].split(",")) > 1]
    assert "dequantize(" in graph and not float_matrices  # no float copy of any weight matrix
    for T in (1, 9):
        inputs = make_sample_inputs(module, seed=T, symbol_value=T)
        want = interpreter.run(quantized, inputs)[0]
        got = model(**inputs)[0]
        assert compare_outputs(want, got).ok, compare_outputs(want, got).message


def test_untied_embedding_tables_are_quantized_and_gathered_packed(tmp_path):
    import slimgraph
    from slimgraph.compiler.driver import CompileOptions, compile_model, load_model

    module = run_pipeline(load_model("tiny-bert")[0], CLEANUP).module
    inputs = make_sample_inputs(module, seed=1, symbol_value=7)
    result = quantize(module, QuantizeSettings("gptq", 8, None, True))
    tables = {r["layer"]: r for r in result.stats["layers"] if r.get("embedding_table")}
    assert "embeddings.word_embeddings" in tables
    assert tables["embeddings.word_embeddings"]["weight_sqnr_db"] > 35
    assert "rounded to nearest" in tables["embeddings.word_embeddings"]["fallback"]
    assert "embeddings.word_embeddings.weight" not in result.module.weights
    reference = interpreter.run(module, inputs)[0]
    got = interpreter.run(result.module, inputs)[0]
    assert compare_outputs(reference, got).cosine > 0.999
    model = slimgraph.load(compile_model(result.module, tmp_path / "bert", CompileOptions()))
    assert compare_outputs(got, model(**inputs)[0]).ok


def test_weights_beyond_float16_scales_fail_with_the_layer_named():
    from slimgraph.compiler.errors import CompressionError

    module = cleaned(layers=1, D=32, F=64)
    weights = dict(module.weights)
    huge = np.array(weights["l0.gate.T"].array)
    huge[:, 3] = 1e30
    weights["l0.gate.T"] = Weight(huge)
    with pytest.raises(CompressionError, match="l0.gate"):
        quantize(module.with_weights(weights), QuantizeSettings("rtn", 4, 16), calibrated=False)


def test_all_steps_compose_in_one_compile_and_the_recipe_is_recorded(tmp_path):
    import json

    import slimgraph
    from slimgraph.compiler.driver import CompileOptions, compile_model, load_model
    from slimgraph.compiler.recipe import recipe_from_flags

    recipe = recipe_from_flags(prune=0.3, prune_ffn=0.25, lowrank=0.1, quantize="int8", group_size=0)
    out = compile_model("tiny-llama", tmp_path / "all", CompileOptions(recipe=recipe))
    report = json.loads((out / "report.json").read_text())
    names = [p["name"] for p in report["passes"]]
    assert names.index("prune") < names.index("structured") < names.index("lowrank") < names.index("quantize") \
        < names.index("fuse")
    assert all(p["changed"] for p in report["passes"] if p["name"] in ("prune", "structured", "lowrank", "quantize"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["steps"]["prune"]["sparsity"] == 0.3
    module = load_model("tiny-llama")[0]
    inputs = make_sample_inputs(module, seed=2, symbol_value=6)
    got = slimgraph.load(out)(**inputs)[0]
    want = interpreter.run(module, inputs)[0]
    assert got.shape == want.shape and np.isfinite(got).all()
    assert compare_outputs(want, got).cosine > 0.5       # lossy, but still the same model


def test_awq_clip_search_can_be_turned_off():
    module = cleaned(layers=1, D=64, F=128)
    with_clip = quantize(module, QuantizeSettings("awq", 4, 16)).module
    without = quantize(module, QuantizeSettings("awq", 4, 16, awq_clip=False)).module
    name = "l0.down.T.qweight"
    assert not np.array_equal(with_clip.weights[name].array, without.weights[name].array)


@pytest.mark.parametrize("model,scores", [
    ("tiny-llama", {"q_proj", "k_proj"}),
    ("tiny-bert", {"query", "key"}),
    ("tiny-gpt", {"c_attn"}),          # one fused q/k/v projection
])
def test_queries_and_keys_are_found_from_the_graph(model, scores):
    from slimgraph.compiler.driver import load_model
    from slimgraph.passes._linear import feeds_attention_scores

    module = run_pipeline(load_model(model)[0], CLEANUP).module
    layers = find_linear_layers(module)
    flagged = {l.name for l in layers if feeds_attention_scores(module.functions[l.function], l.node)}
    assert flagged == {l.name for l in layers if l.name.rsplit(".", 1)[-1] in scores}
    assert len(flagged) >= 2 * len(scores)          # in every layer of the model


def test_awq_clip_search_skips_queries_and_keys(tmp_path):
    """The clip search changes values' weights but leaves queries' and keys' as the scale search made them."""
    from slimgraph.compiler.driver import load_model

    module = run_pipeline(load_model("tiny-llama")[0], CLEANUP).module
    data = [make_sample_inputs(module, seed=s, symbol_value=12) for s in range(3)]

    def run(clip: bool) -> Module:
        context = CompressionContext(Recipe({"quantize": QuantizeSettings("awq", 4, 16, awq_clip=clip)}),
                                     lambda: data)
        return quantize_pass(context).run(module).module

    with_clip, without = run(True), run(False)
    prefix = "model.layers.0.self_attn"
    weight = lambda m, layer: next(a.array for n, a in m.weights.items()  # noqa: E731
                                   if n.startswith(f"{prefix}.{layer}") and n.endswith(".qweight"))
    for layer in ("q_proj", "k_proj"):
        assert np.array_equal(weight(with_clip, layer), weight(without, layer))
    assert not np.array_equal(weight(with_clip, "v_proj"), weight(without, "v_proj"))

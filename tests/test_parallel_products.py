"""merge_parallel_products: golden IR, numerics against the interpreter, what must not merge."""

from __future__ import annotations

import numpy as np
import pytest

from golden_util import GraphMaker, assert_golden, assert_same_outputs

from slimgraph.compiler import ops
from slimgraph.compiler.ir import Module
from slimgraph.compiler.passmanager import get_pass, run_pipeline
from slimgraph.compiler.printer import print_module
from slimgraph.compiler.types import DType, TensorType
from slimgraph.passes.parallel_products import merged_weight_name

D = 8


def merge(module: Module):
    return get_pass("merge_parallel_products").run(module)


def quantized(g: GraphMaker, name: str, columns: int, *, group: int = 4, rows: int = D) -> str:
    """A 4-bit dequantize of random packed words (8 codes a word along the rows)."""
    words = g.weight(f"{name}.qweight", None, g.rng.integers(0, 2**32, (rows // 8, columns), dtype=np.uint32))
    scales = g.weight(f"{name}.scales", (rows // group, columns))
    zeros = g.weight(f"{name}.zeros", None, g.rng.integers(0, 16, (rows // group, columns)).astype(np.float32))
    return g(ops.DEQUANTIZE, words, scales, zeros, bits=4, group_size=group, rows=rows)


def attention_and_mlp() -> Module:
    """q/k/v products of one normalized input, a product of another input, and a quantized
    gate/up pair with float16 results (a cast after each product)."""
    g = GraphMaker(seed=3)
    x = g.b.param("x", TensorType(DType.f32, (1, "T", D)))
    n = g(ops.MUL, x, g.weight("norm", (D,)), name="n")
    q = g(ops.MATMUL, n, g.weight("attn.q_proj.w", (D, 8)), name="q")
    k = g(ops.MATMUL, n, g.weight("attn.k_proj.w", (D, 4)), name="k")
    v = g(ops.MATMUL, n, g.weight("attn.v_proj.w", (D, 4)), name="v")
    other = g(ops.MATMUL, x, g.weight("attn.o_proj.w", (D, 8)), name="other")
    gate = g(ops.CAST, g(ops.MATMUL, n, quantized(g, "mlp.gate_proj.w", 16)), dtype=DType.f16, name="gate")
    up = g(ops.CAST, g(ops.MATMUL, n, quantized(g, "mlp.up_proj.w", 16)), dtype=DType.f16, name="up")
    act = g(ops.CAST, g(ops.MUL, g(ops.SILU, gate), up), dtype=DType.f32, name="act")
    return g.module(q, k, v, other, act)


def test_merges_qkv_and_quantized_gate_up_golden():
    before = attention_and_mlp()
    text_before = print_module(before)
    result = merge(before)
    assert result.changed
    assert result.stats == {"groups": 2, "products_merged": 5, "weights_dropped": 9}
    assert print_module(before) == text_before                       # the input is not mutated
    assert_golden("parallel_products/attention_and_mlp", print_module(result.module))
    assert_same_outputs(before, result.module)
    names = set(result.module.weights)
    assert {"attn.q_proj_k_proj_v_proj.w", "mlp.gate_proj_up_proj.w.qweight", "attn.o_proj.w"} <= names
    assert "attn.q_proj.w" not in names and "mlp.up_proj.w.scales" not in names
    matmuls = [n for n in result.module.main.nodes if n.op is ops.MATMUL]
    assert len(matmuls) == 3


def test_second_run_changes_nothing():
    once = merge(attention_and_mlp()).module
    again = merge(once)
    assert not again.changed and print_module(again.module) == print_module(once)


def test_products_that_must_stay_apart():
    """Different left operands, different group sizes, a dequantize with a second reader, a float
    and a quantized weight: each product keeps its own weight."""
    g = GraphMaker(seed=5)
    x = g.b.param("x", TensorType(DType.f32, (2, D)))
    wide = g.b.param("wide", TensorType(DType.f32, (2, 2 * D)))
    a = g(ops.MATMUL, x, g.weight("a", (D, 4)), name="a")
    b = g(ops.MATMUL, wide, g.weight("b", (2 * D, 4)), name="b")
    c = g(ops.MATMUL, x, quantized(g, "c", 8, group=4), name="c")
    d = g(ops.MATMUL, x, quantized(g, "d", 8, group=8), name="d")
    shared = quantized(g, "e", 8)
    e = g(ops.MATMUL, x, shared, name="e")
    module = g.module(a, b, c, d, e, shared)
    result = merge(module)
    assert not result.changed and result.module is module


def test_merged_weight_name():
    assert merged_weight_name(["l.0.q_proj.weight.T", "l.0.k_proj.weight.T"]) == "l.0.q_proj_k_proj.weight.T"
    assert merged_weight_name(["gate", "up"]) == "gate_up"
    assert merged_weight_name(["m.gate.w", "m.up"]) == "m.gate_w_up"


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert"])
def test_real_models_lose_kernels_not_accuracy(model):
    """q/k/v and gate/up of the packaged tiny models become one product each: fewer kernels, same outputs."""
    from slimgraph.compiler.driver import load_model

    module, _ = load_model(model)
    without = ["fold_constants", "simplify", "cse", "dce", "simplify", "fuse", "dce"]
    with_merge = without[:5] + ["merge_parallel_products"] + without[5:]
    plain = run_pipeline(module, without).module
    merged_report = run_pipeline(module, with_merge)
    merged = merged_report.module
    layers = 2
    per_layer = 2      # q/k/v: one product for three (gate/up: one product, its silu(g) * u its own kernel)
    assert plain.num_kernels() - merged.num_kernels() == layers * per_layer
    assert_same_outputs(plain, merged)

"""Golden-file helper and the small hand-built graphs shared by the pass tests.

``assert_golden("simplify/layer_norm", text)`` compares ``text`` with
``tests/golden/simplify/layer_norm.ir``; with ``SLIMGRAPH_UPDATE_GOLDEN=1`` it (re)writes the file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.ir import FunctionBuilder, Module, Weight
from slimgraph.compiler.types import DType, TensorType

GOLDEN_DIR = Path(__file__).parent / "golden"
F32, I64 = DType.f32, DType.i64


def assert_same_outputs(before: Module, after: Module, inputs=None) -> None:
    """The interpreter gives ``after`` the outputs of ``before`` (passmanager.compare_outputs)."""
    from slimgraph.compiler import interpreter
    from slimgraph.compiler.passmanager import compare_outputs, make_sample_inputs

    inputs = inputs if inputs is not None else make_sample_inputs(before)
    for ref, got in zip(interpreter.run(before, inputs), interpreter.run(after, inputs), strict=True):
        cmp = compare_outputs(ref, got)
        assert cmp.ok, cmp.message


def artifact_cosine_against_its_ir(artifact: Path, seed: int = 1) -> float:
    """Cosine between a compiled artifact's output and the interpreter running the artifact's own
    final IR (``graph.ir``) on its own weights: the kernels' correctness, not compression error."""
    import slimgraph
    from slimgraph.backends.artifact import artifact_module
    from slimgraph.compiler import interpreter
    from slimgraph.compiler.passmanager import compare_outputs, make_sample_inputs

    module = artifact_module(artifact)
    inputs = make_sample_inputs(module, seed=seed, symbol_value=1)
    got = slimgraph.load(artifact)(**inputs)[0]
    return compare_outputs(interpreter.run(module, inputs)[0], got).cosine


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN_DIR / f"{name}.ir"
    if os.environ.get("SLIMGRAPH_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"missing golden file {path}; run with SLIMGRAPH_UPDATE_GOLDEN=1"
    expected = path.read_text()
    assert text == expected, f"IR differs from {path} (SLIMGRAPH_UPDATE_GOLDEN=1 regenerates it)"


class GraphMaker:
    """FunctionBuilder plus seeded random weights, for terse test graphs."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.weights: dict[str, Weight] = {}
        self.b = FunctionBuilder("main", self.weights)

    def weight(self, name: str, shape, array=None) -> str:
        data = array if array is not None else self.rng.standard_normal(shape).astype(np.float32)
        self.weights[name] = Weight(np.asarray(data))
        return "@" + name

    def const(self, value: float, dtype: DType = F32, shape=()) -> str:
        return self.b.add(ops.CONSTANT, [], {"value": value, "dtype": dtype, "shape": shape})

    def __call__(self, op, *inputs, name=None, **attrs) -> str:
        return self.b.add(op, inputs, attrs, name=name)

    def module(self, *outputs: str) -> Module:
        self.b.output(*outputs)
        return Module({"main": self.b.build()}, self.weights, {"source": "test"})


def llama_block(layers: int = 2, D: int = 8, F: int = 16, V: int = 11) -> Module:
    """Token embedding, then per layer: RMSNorm written with primitives, SwiGLU MLP, residual;
    a tied lm_head and a softmax. Linear layers are ``matmul(x, transpose(@W))``."""
    g = GraphMaker()
    ids = g.b.param("input_ids", TensorType(I64, (1, "T")))
    emb = g.weight("embed", (V, D))
    h = g(ops.TAKE, emb, ids, name="h")
    for i in range(layers):
        sq = g(ops.POW, h, g.const(2.0))
        ms = g(ops.MEAN, sq, axes=[-1], keepdims=True)
        r = g(ops.RSQRT, g(ops.ADD, ms, g.const(1e-6)))
        n = g(ops.MUL, g.weight(f"l{i}.norm", (D,)), g(ops.MUL, h, r))
        gate = g(ops.MATMUL, n, g(ops.TRANSPOSE, g.weight(f"l{i}.gate", (F, D)), perm=[1, 0]))
        up = g(ops.MATMUL, n, g(ops.TRANSPOSE, g.weight(f"l{i}.up", (F, D)), perm=[1, 0]))
        act = g(ops.MUL, g(ops.SILU, gate), up)
        down = g(ops.MATMUL, act, g(ops.TRANSPOSE, g.weight(f"l{i}.down", (D, F)), perm=[1, 0]))
        h = g(ops.ADD, h, down, name="h")
    logits = g(ops.MATMUL, h, g(ops.TRANSPOSE, emb, perm=[1, 0]), name="logits")
    return g.module(g(ops.SOFTMAX, logits, name="probs"))


def causal_attention(T: int | str = 5, D: int = 4) -> Module:
    """Scores of q and k plus the Hugging Face causal mask built from shapes only:
    arange, reshape, compare, cumsum over the (cast) bool mask, where(0, -inf), expand.
    (``cumsum(not allowed) <= 0`` is the causal mask again, computed the roundabout HF way.)"""
    g = GraphMaker()
    q = g.b.param("q", TensorType(F32, (1, 1, T, D)))
    k = g.b.param("k", TensorType(F32, (1, 1, T, D)))
    pos = g(ops.ARANGE, length=T, name="pos")
    allowed = g(ops.LE, g(ops.RESHAPE, pos, shape=[1, T]), g(ops.RESHAPE, pos, shape=[T, 1]), name="allowed")
    seen = g(ops.CUMSUM, g(ops.CAST, g(ops.LOGICAL_NOT, allowed), dtype=I64), axis=-1)
    visible = g(ops.LE, seen, g.const(0.0, I64), name="visible")
    mask = g(ops.WHERE, visible, g.const(0.0), g.const(-math.inf), name="mask")
    mask4 = g(ops.BROADCAST_TO, g(ops.RESHAPE, mask, shape=[1, 1, T, T]), shape=[1, 1, T, T], name="mask4")
    scores = g(ops.MATMUL, q, g(ops.TRANSPOSE, k, perm=[0, 1, 3, 2]), name="scores")
    scaled = g(ops.MUL, scores, g.const(0.5))
    return g.module(g(ops.SOFTMAX, g(ops.ADD, scaled, mask4), name="probs"))


def layer_norm_primitives(D: int = 6) -> Module:
    """ONNX-style decomposed LayerNorm (the centered value written twice) and a GELU MLP."""
    g = GraphMaker()
    x = g.b.param("x", TensorType(F32, (2, "T", D)))
    mean = g(ops.MEAN, x, axes=[-1], keepdims=True)
    d = g(ops.SUB, x, mean)
    d2 = g(ops.SUB, x, g(ops.MEAN, x, axes=[-1], keepdims=True))
    var = g(ops.MEAN, g(ops.POW, d2, g.const(2.0)), axes=[-1], keepdims=True)
    y = g(ops.DIV, d, g(ops.SQRT, g(ops.ADD, var, g.const(1e-5))))
    y = g(ops.ADD, g(ops.MUL, y, g.weight("ln.weight", (D,))), g.weight("ln.bias", (D,)), name="ln")
    hidden = g(ops.ADD, g(ops.MATMUL, y, g(ops.TRANSPOSE, g.weight("fc.weight", (D, D)), perm=[1, 0])),
               g.weight("fc.bias", (D,)))
    return g.module(g(ops.GELU, hidden, name="out"))


def softmax_primitives() -> Module:
    """softmax written as exp(x - max) / sum, along axis 1, then scaled by 1 (a no-op)."""
    g = GraphMaker()
    x = g.b.param("x", TensorType(F32, (3, 5)))
    e = g(ops.EXP, g(ops.SUB, x, g(ops.MAX, x, axes=[1], keepdims=True)))
    p = g(ops.DIV, e, g(ops.SUM, e, axes=[1], keepdims=True))
    return g.module(g(ops.MUL, p, g.const(1.0), name="out"))


def conv_batch_norm() -> Module:
    """conv2d with bias, inference batch norm, relu."""
    g = GraphMaker()
    x = g.b.param("x", TensorType(F32, (1, 3, 8, 8)))
    c = g(ops.CONV2D, x, g.weight("conv.weight", (4, 3, 3, 3)), g.weight("conv.bias", (4,)), padding=[1, 1, 1, 1])
    var = np.abs(g.rng.standard_normal(4)).astype(np.float32) + 0.5
    bn = g(ops.BATCH_NORM, c, g.weight("bn.mean", (4,)), g.weight("bn.var", (4,), var),
           g.weight("bn.weight", (4,)), g.weight("bn.bias", (4,)))
    return g.module(g(ops.RELU, bn, name="out"))


def layout_noise() -> Module:
    """Reshape of reshape, transpose pairs, no-op casts and neutral elements, duplicates."""
    g = GraphMaker()
    x = g.b.param("x", TensorType(F32, (2, 3, 4)))
    r = g(ops.RESHAPE, g(ops.RESHAPE, x, shape=[6, 4]), shape=[3, 8])
    back = g(ops.RESHAPE, g(ops.RESHAPE, r, shape=[24]), shape=[2, 3, 4])
    t = g(ops.TRANSPOSE, g(ops.TRANSPOSE, back, perm=[1, 0, 2]), perm=[1, 0, 2])
    t2 = g(ops.TRANSPOSE, g(ops.TRANSPOSE, t, perm=[2, 0, 1]), perm=[1, 2, 0])
    c = g(ops.CAST, g(ops.MUL, t2, g.const(1.0)), dtype=F32)
    s = g(ops.SUB, g(ops.ADD, g.const(0.0), c), g.const(0.0))
    a = g(ops.ADD, s, x)
    b = g(ops.ADD, x, s)
    w1 = g.weight("w1", (4,))
    g.weight("w2", (4,), g.weights["w1"].array.copy())
    return g.module(g(ops.MUL, g(ops.MUL, a, b), g(ops.ADD, w1, "@w2"), name="out"))

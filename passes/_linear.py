"""Linear layers as the compression passes see them, and the per-layer rule matching they share.

After the cleanup passes (constant folding pre-transposes ``x @ W.T`` once), a linear layer is
``matmul(x, @W)`` with ``W`` a 2-D float32 weight of shape ``[K, N]`` (K inputs, N outputs).
A layer is named after its weight without the ``.weight.T`` / ``.weight`` suffix
(``model.layers.0.mlp.down_proj``), which is what per-layer rules match against (shell-style
patterns, ``*.mlp.*``).

A weight may be read by several matmuls (shared projections) and by a ``take`` that gathers
its columns (a token embedding tied to the LM head reads ``W[:, ids]`` of the transposed
table): passes must rewrite every reader of a weight they replace.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.ir import Function, Module, Node
from slimgraph.compiler.types import DType

_SUFFIXES = (".weight.T", ".weight", ".T")
_DERIVED = (".pruned", ".lowrank_u", ".lowrank_v")


def layer_name(weight: str) -> str:
    """``model.layers.0.mlp.down_proj.weight.T`` -> ``model.layers.0.mlp.down_proj``; weights that
    earlier compression steps derived (``....weight.T.pruned``, ``.lowrank_u``) keep their layer's name."""
    stripped = True
    while stripped:
        stripped = False
        for suffix in _DERIVED:
            if weight.endswith(suffix):
                weight, stripped = weight[: -len(suffix)], True
    for suffix in _SUFFIXES:
        if weight.endswith(suffix):
            return weight[: -len(suffix)]
    return weight


@dataclass(frozen=True)
class LinearLayer:
    """``node`` = matmul(``input``, @``weight``) in entry function ``function``; W is [K, N]."""

    name: str
    function: str
    node: str
    input: str
    weight: str
    k: int
    n: int

    @property
    def params(self) -> int:
        return self.k * self.n


def _is_linear(node: Node, module: Module) -> bool:
    if node.op is not ops.MATMUL or not node.inputs[1].startswith("@") or node.inputs[0].startswith("@"):
        return False
    weight = module.weights.get(node.inputs[1][1:])
    return weight is not None and weight.type.rank == 2 and weight.type.dtype is DType.f32


def find_linear_layers(module: Module) -> list[LinearLayer]:
    """Every ``matmul(activation, @W)`` of the entry functions, in program order."""
    layers = []
    for fn in module.entries:
        for node in fn.nodes:
            if _is_linear(node, module):
                weight = node.inputs[1][1:]
                k, n = module.weights[weight].type.shape
                layers.append(LinearLayer(layer_name(weight), fn.name, node.name, node.inputs[0], weight, k, n))
    return layers


def weight_readers(fn: Function, weight: str) -> list[Node]:
    """Nodes of ``fn`` that read ``@weight``."""
    ref = "@" + weight
    return [n for n in fn.nodes if ref in n.inputs]


def only_linear_readers(module: Module, layers: list[LinearLayer]) -> set[str]:
    """Weights read by nothing but the given linear layers (safe to reshape or factorize)."""
    linear_nodes = {(l.function, l.node) for l in layers}
    readers: dict[str, bool] = {}
    for fn in module.entries:
        for node in fn.nodes:
            for ref in node.inputs:
                if ref.startswith("@"):
                    ok = (fn.name, node.name) in linear_nodes and node.inputs[1] == ref
                    readers[ref[1:]] = readers.get(ref[1:], True) and ok
    return {w for w, ok in readers.items() if ok}


def matches(pattern: str, name: str) -> bool:
    """Shell-style match of a rule pattern against a layer name (or its weight name)."""
    return fnmatch.fnmatchcase(name, pattern)


def output_sqnr_db(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of the layer output on calibration rows x, in dB:
    ``10 log10(||x W||^2 / ||x W - x W_hat||^2)`` (inf when exact)."""
    ref = x.astype(np.float64) @ w.astype(np.float64)
    err = ref - x.astype(np.float64) @ w_hat.astype(np.float64)
    noise = float(np.sum(err * err))
    signal = float(np.sum(ref * ref))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def _downstream(users: dict[str, list[Node]], value: str):
    """Nodes reachable from ``value`` without passing through a contraction (matmul, conv): the
    contractions met are yielded but not walked past."""
    seen, stack = set(), [value]
    while stack:
        for node in users.get(stack.pop(), ()):
            if node.name in seen:
                continue
            seen.add(node.name)
            yield node
            if node.op.category is not ops.OpCategory.CONTRACTION:
                stack.append(node.name)


def feeds_attention_scores(fn: Function, value: str) -> bool:
    """Whether ``value`` (a layer's output) is a query or key: it reaches, through data movement and
    elementwise ops only (reshapes, rotary embedding), a matmul of two activations whose result
    goes on to a softmax. Values and everything else reach no such product."""
    users = fn.users()
    for node in _downstream(users, value):
        scores = node.op is ops.MATMUL and not any(i.startswith("@") for i in node.inputs)
        if scores and any(n.op is ops.SOFTMAX for n in _downstream(users, node.name)):
            return True
    return False

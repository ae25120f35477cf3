"""Low-rank factorization of linear layers (recipe step ``lowrank``).

Each chosen layer ``matmul(x, @W)`` (W: [K, N]) becomes two thinner matmuls::

    matmul(matmul(x, @W.lowrank_u), @W.lowrank_v)        U: [K, r], V: [r, N], W ~ U V

which cost ``r (K + N)`` weights and multiply-adds per token instead of ``K N``. The rank comes
from the settings (:func:`~slimgraph.passes.lowrank_math.rank_for`): ``ratio`` removes that
fraction of the layer's parameters, ``r = floor((1 - ratio) K N / (K + N))``; ``energy`` keeps
the smallest r with ``sum_{i<r} sigma_i^2 >= energy * ||W||_F^2`` (singular values of W itself,
whatever the method). A rank with ``r (K + N) >= K N`` saves nothing, so that layer is skipped.

Methods (:mod:`slimgraph.passes.lowrank_math`): ``svd`` minimises ``||W - U V||_F`` (no
calibration); ``asvd`` scales input rows by ``E|x_k|^0.5`` first (calibration ``abs_mean``);
``whiten`` minimises the output error ``E||x W - x U V||^2`` exactly via the Cholesky factor of
the input Hessian ``H = E[x x^T]``. A weight read by several linear layers is factorized once
with their pooled statistics, and every reader is rewritten. The old weight leaves the module.

Skipped (``stats["skipped"]``, with the reason): weights read by anything but linear layers,
ranks that save nothing, and layers that are already one half of a factorization
``x @ A @ B`` (A [K, r] feeding only B [r, N] with ``r (K + N) < K N``) -- so running the pass
again on its own output changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.calibration import InputStats
from slimgraph.compiler.errors import CalibrationError
from slimgraph.compiler.ir import Module, Node
from slimgraph.compiler.passmanager import PassInfo, PassResult
from slimgraph.compiler.recipe import LowRankSettings
from slimgraph.passes._compress import (CompressionContext, layer_row, rewrite_readers, select_layers, summarize,
                                        weight_matrix)
from slimgraph.passes._linear import LinearLayer, find_linear_layers, only_linear_readers
from slimgraph.passes._rewrite import Rewriter, add_weight
from slimgraph.passes.lowrank_math import (asvd_factorize, rank_for, svd_factorize, whitened_factorize,
                                           worth_factorizing)
from slimgraph.passes.prune import group_by_weight, layer_sqnr, other_readers, pooled_stats, skip_row


@dataclass(frozen=True)
class LowRankWeight:
    """The two factors replacing one weight (a :class:`~slimgraph.passes._compress.Replacement`)."""

    u: str   # "@W.lowrank_u", [K, r]
    v: str   # "@W.lowrank_v", [r, N]

    def matmul(self, rw: Rewriter, node: Node, x: str) -> str:
        thin = rw.add(ops.MATMUL, [x, self.u], name=f"{node.name}_lowrank")
        return rw.add(ops.MATMUL, [thin, self.v], name=node.name)

    def take(self, rw: Rewriter, node: Node) -> str | None:
        return None  # never reached: weights with non-matmul readers are not factorized


Factorize = Callable[[np.ndarray, InputStats | None, int], tuple[np.ndarray, np.ndarray]]
METHODS: dict[str, Factorize] = {
    "svd": lambda w, stats, rank: svd_factorize(w, rank),
    "asvd": lambda w, stats, rank: asvd_factorize(w, stats.abs_mean, rank),
    "whiten": lambda w, stats, rank: whitened_factorize(w, stats.hessian, rank),
}


def choose_rank(w: np.ndarray, settings: LowRankSettings) -> int:
    K, N = w.shape
    if settings.energy is not None:
        sigma = np.linalg.svd(w.astype(np.float64), compute_uv=False)
        return rank_for(K, N, energy=settings.energy, singular_values=sigma)
    return rank_for(K, N, ratio=settings.ratio)


def factorized_layers(module: Module, linear: list[LinearLayer]) -> set[tuple[str, str]]:
    """(function, node) of both halves of every ``x @ A @ B`` where A's output feeds only B and
    the pair is cheaper than one [K, N] matrix: an existing factorization, left alone."""
    by_node = {(l.function, l.node): l for l in linear}
    found: set[tuple[str, str]] = set()
    for fn in module.entries:
        users = fn.users()
        for second in (l for l in linear if l.function == fn.name):
            first = by_node.get((fn.name, second.input))
            if first is None or [u.name for u in users.get(first.node, [])] != [second.node]:
                continue
            if first.node not in fn.outputs and worth_factorizing(first.k, second.n, first.n):
                found |= {(fn.name, first.node), (fn.name, second.node)}
    return found


class LowRankPass:
    """Replace linear layers by two thin matmuls ``x @ U @ V`` (SVD / ASVD / whitened SVD) where
    the recipe's rank saves parameters."""

    def __init__(self, context: CompressionContext):
        self.context = context

    def __call__(self, module: Module) -> PassResult:
        linear = find_linear_layers(module)
        safe = only_linear_readers(module, linear)
        factored = factorized_layers(module, linear)
        chosen, skipped = [], []
        for layer, settings in select_layers(module, self.context.recipe, "lowrank"):
            if layer.weight not in safe:
                skipped.append(skip_row(layer, other_readers(module, layer.weight, linear)))
            elif (layer.function, layer.node) in factored:
                skipped.append(skip_row(layer, "already factorized (one half of x @ A @ B)"))
            else:
                chosen.append((layer, settings))
        plans = []
        for layers, settings in group_by_weight(chosen).values():
            w = weight_matrix(module, layers[0])
            rank = choose_rank(w, settings)
            if worth_factorizing(w.shape[0], w.shape[1], rank):
                plans.append((layers, settings, w, rank))
            else:
                K, N = w.shape
                skipped.append(skip_row(layers[0], f"rank {rank} saves nothing: "
                                                   f"{rank}*({K}+{N}) = {rank * (K + N)} >= {K}*{N} = {K * N}"))
        if not plans:
            return PassResult(module, False, summarize([], skipped=skipped))
        inputs = {l.input for layers, *_ in plans for l in layers}
        needs = any(s.needs_calibration for _, s, *_ in plans)
        stats = (self.context.stats(module, inputs, "ASVD/whitened low-rank factorization") if needs
                 else self.context.optional_stats(module, inputs))
        weights, replacements, rows = dict(module.weights), {}, []
        for layers, settings, w, rank in plans:
            replacements[layers[0].weight], row = _factorize(layers, settings, w, rank, stats, weights)
            rows.append(row)
        for name in replacements:
            del weights[name]
        new = rewrite_readers(module, weights, replacements)
        return PassResult(new, True, summarize(rows, skipped=skipped))


def _factorize(layers, settings: LowRankSettings, w: np.ndarray, rank: int, stats, weights):
    """Factor one weight, store U and V next to it; returns (replacement, report row)."""
    layer = layers[0]
    layer_stats = pooled_stats(stats, [l.input for l in layers])
    if settings.needs_calibration and layer_stats is None:
        raise CalibrationError(f"{settings.method} factorization of {layer.name} needs statistics of its input "
                               f"%{layer.input}, which the calibration run did not observe")
    U, V = METHODS[settings.method](w, layer_stats, rank)
    u = add_weight(weights, f"{layer.weight}.lowrank_u", np.ascontiguousarray(U, np.float32))
    v = add_weight(weights, f"{layer.weight}.lowrank_v", np.ascontiguousarray(V, np.float32))
    extra = {"rank": rank}
    if len(layers) > 1:
        extra["readers"] = [l.name for l in layers]
    sqnr = layer_sqnr(layer_stats, w, U.astype(np.float64) @ V.astype(np.float64))
    return LowRankWeight(u, v), layer_row(layer, settings.method, rank * (layer.k + layer.n), sqnr, **extra)


def lowrank_pass(context: CompressionContext) -> PassInfo:
    return PassInfo("lowrank", LowRankPass(context), LowRankPass.__doc__, lossy=True)

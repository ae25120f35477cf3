"""Unstructured and N:M weight pruning of linear layers (recipe step ``prune``).

For a layer ``y = x @ W`` (W: [K, N], K inputs) pruning zeroes weights: ``W_hat = W + D``. On the
calibration distribution the output error of the change is::

    E ||x D||^2 = tr(D^T H D),      H = E[x x^T]   (the input Hessian, [K, K])

The methods differ in how much of H they use (see :mod:`slimgraph.passes.pruning_criteria`):

* ``magnitude`` drops the smallest ``|W_kn|`` of each output column (H taken as the identity:
  no calibration needed);
* ``wanda`` scores ``|W_kn| * sqrt(H_kk)`` (the diagonal of H: input channel norms);
* ``sparsegpt`` uses all of H: Optimal-Brain-Surgeon pruning that also *updates* the surviving
  weights to compensate, minimising ``tr(D^T H D)`` row by row.

Every output column loses exactly ``floor(sparsity * K)`` weights; an ``n_m = (n, m)`` pattern
instead keeps n of every m consecutive inputs (2:4 is 50% sparse). The weight keeps its name and
shape: the new module gets a new weights dict holding the pruned array under the same name (the
input module and its arrays are untouched). A weight read by several linear layers is pruned once
for all of them, with the token-weighted mean of their Hessians (the sum of their output errors).

Skipped layers are listed in ``stats["skipped"]`` with the reason: weights also read by something
other than a linear layer (a tied embedding's ``take``), N:M patterns that do not divide K, and
layers *already* at the target (every column / group has at least the zeros the target asks for).
So ``changed`` is honest: re-running the pass at the same setting changes nothing and says so.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from slimgraph.compiler.calibration import InputStats
from slimgraph.compiler.errors import CalibrationError
from slimgraph.compiler.ir import Module, Weight
from slimgraph.compiler.passmanager import PassInfo, PassResult
from slimgraph.compiler.recipe import PruneSettings
from slimgraph.passes._compress import CompressionContext, layer_row, select_layers, summarize, weight_matrix
from slimgraph.passes._linear import LinearLayer, find_linear_layers, only_linear_readers, output_sqnr_db
from slimgraph.passes.pruning_criteria import magnitude_mask, pruned_per_column, sparsegpt_prune, wanda_mask


# ----------------------------------------------------------------------------- shared with lowrank
def pooled_stats(stats: dict[str, InputStats], inputs: list[str]) -> InputStats | None:
    """Statistics of several inputs that feed the same weight, pooled over all their tokens: the
    Hessian and abs-mean are token-weighted means (so ``tr(D^T H D)`` sums the layers' output
    errors), the sample rows are concatenated. None when no input was observed."""
    found = [stats[i] for i in dict.fromkeys(inputs) if i in stats]
    if len(found) <= 1:
        return found[0] if found else None
    total = sum(s.tokens for s in found)
    hessian = sum(s.hessian * s.tokens for s in found) / total
    abs_mean = sum(s.abs_mean * s.tokens for s in found) / total
    return InputStats(hessian, abs_mean, np.concatenate([s.sample for s in found]), total,
                      np.concatenate([s.peaks for s in found if s.peaks is not None]))


def other_readers(module: Module, weight: str, linear: list[LinearLayer]) -> str:
    """Why a weight cannot be rewritten: the ops other than linear layers that read it."""
    linear_nodes = {(l.function, l.node) for l in linear}
    ref, found = "@" + weight, []
    for fn in module.entries:
        for node in fn.nodes:
            if ref in node.inputs and not ((fn.name, node.name) in linear_nodes and node.inputs[1] == ref):
                found.append(f"%{node.name} ({node.op.name})")
    return "also read by " + ", ".join(found[:3]) + (" ..." if len(found) > 3 else "")


def skip_row(layer: LinearLayer, reason: str) -> dict:
    return {"layer": layer.name, "weight": layer.weight, "reason": reason}


def group_by_weight(chosen: list[tuple[LinearLayer, object]]) -> dict[str, tuple[list[LinearLayer], object]]:
    """weight -> (the chosen layers reading it, the settings of the first of them)."""
    groups: dict[str, tuple[list, object]] = {}
    for layer, settings in chosen:
        groups.setdefault(layer.weight, ([], settings))[0].append(layer)
    return groups


def layer_sqnr(stats: InputStats | None, w: np.ndarray, w_hat: np.ndarray) -> float | None:
    """Output SQNR of the replaced weight on the calibration sample rows (None without them)."""
    if stats is None or not len(stats.sample):
        return None
    return output_sqnr_db(stats.sample, w, w_hat)


# ----------------------------------------------------------------------------- the methods
def _magnitude(w: np.ndarray, stats: InputStats | None, s: PruneSettings) -> np.ndarray:
    return np.where(magnitude_mask(w, s.sparsity, n_m=s.n_m), w, np.float32(0.0))


def _wanda(w: np.ndarray, stats: InputStats | None, s: PruneSettings) -> np.ndarray:
    return np.where(wanda_mask(w, stats.hessian, s.sparsity, n_m=s.n_m), w, np.float32(0.0))


def _sparsegpt(w: np.ndarray, stats: InputStats | None, s: PruneSettings) -> np.ndarray:
    return sparsegpt_prune(w, stats.hessian, s.sparsity, n_m=s.n_m)[0]


METHODS: dict[str, Callable[[np.ndarray, InputStats | None, PruneSettings], np.ndarray]] = {
    "magnitude": _magnitude, "wanda": _wanda, "sparsegpt": _sparsegpt,
}


def target_sparsity(s: PruneSettings) -> float:
    return 1.0 - s.n_m[0] / s.n_m[1] if s.n_m is not None else s.sparsity


def pattern(s: PruneSettings) -> str:
    return f"{s.n_m[0]}:{s.n_m[1]}" if s.n_m is not None else "unstructured"


def already_pruned(w: np.ndarray, s: PruneSettings) -> bool:
    """True when every output column (every N:M group) already has the zeros the target asks for."""
    K, N = w.shape
    zeros = w == 0
    if s.n_m is not None:
        n, m = s.n_m
        return bool(zeros.reshape(K // m, m, N).sum(axis=1).min() >= m - n)
    return bool(zeros.sum(axis=0).min() >= pruned_per_column(K, s.sparsity))


def _skip_reason(module: Module, layer: LinearLayer, s: PruneSettings, safe: set, linear: list) -> str | None:
    if layer.weight not in safe:
        return other_readers(module, layer.weight, linear)
    if s.n_m is not None and layer.k % s.n_m[1]:
        return f"K={layer.k} is not a multiple of m={s.n_m[1]} for the {pattern(s)} pattern"
    if already_pruned(weight_matrix(module, layer), s):
        return f"already at the target ({pattern(s)}, sparsity {target_sparsity(s):.3g})"
    return None


# ----------------------------------------------------------------------------- the pass
class PrunePass:
    """Zero the least important weights of linear layers (magnitude / Wanda / SparseGPT,
    unstructured or N:M) per the recipe; weights keep their names and shapes."""

    def __init__(self, context: CompressionContext):
        self.context = context

    def __call__(self, module: Module) -> PassResult:
        linear = find_linear_layers(module)
        safe = only_linear_readers(module, linear)
        chosen, skipped = [], []
        for layer, settings in select_layers(module, self.context.recipe, "prune"):
            reason = _skip_reason(module, layer, settings, safe, linear)
            if reason is None:
                chosen.append((layer, settings))
            else:
                skipped.append(skip_row(layer, reason))
        if not chosen:
            return PassResult(module, False, summarize([], skipped=skipped))
        inputs = {layer.input for layer, _ in chosen}
        needs = any(s.needs_calibration for _, s in chosen)
        stats = (self.context.stats(module, inputs, "Wanda/SparseGPT pruning") if needs
                 else self.context.optional_stats(module, inputs))
        weights, rows = dict(module.weights), []
        for layers, settings in group_by_weight(chosen).values():
            row = self._prune_weight(module, layers, settings, stats, weights)
            if row is None:
                skipped.append(skip_row(layers[0], "pruning left the weight unchanged"))
            else:
                rows.append(row)
        if not rows:
            return PassResult(module, False, summarize([], skipped=skipped))
        new = Module(module.functions, weights, module.metadata)
        return PassResult(new, True, summarize(rows, skipped=skipped))

    def _prune_weight(self, module, layers, settings: PruneSettings, stats, weights) -> dict | None:
        layer = layers[0]
        w = weight_matrix(module, layer)
        layer_stats = pooled_stats(stats, [l.input for l in layers])
        if settings.needs_calibration and layer_stats is None:
            raise CalibrationError(f"{settings.method} pruning of {layer.name} needs statistics of its input "
                                   f"%{layer.input}, which the calibration run did not observe")
        w_hat = np.asarray(METHODS[settings.method](w, layer_stats, settings), dtype=np.float32)
        if np.array_equal(w_hat, w):
            return None
        weights[layer.weight] = Weight(w_hat)
        kept = int(np.count_nonzero(w_hat))
        extra = {"pattern": pattern(settings), "target_sparsity": round(target_sparsity(settings), 4),
                 "sparsity": round(1.0 - kept / w_hat.size, 4)}
        if len(layers) > 1:
            extra["readers"] = [l.name for l in layers]
        return layer_row(layer, settings.method, kept, layer_sqnr(layer_stats, w, w_hat), **extra)


def prune_pass(context: CompressionContext) -> PassInfo:
    return PassInfo("prune", PrunePass(context), PrunePass.__doc__, lossy=True)

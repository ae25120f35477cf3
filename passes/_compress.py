"""What the compression passes share: the recipe and calibration context, choosing the layers a
step applies to, rewriting every reader of a replaced weight, and the per-layer report rows.

A compression pass is configured (recipe + calibration), so it is built by a factory and handed
to the pass manager as a :class:`~slimgraph.compiler.passmanager.PassInfo`; like every pass it
returns ``(module, changed, stats)`` and never mutates its input. ``stats["layers"]`` holds one
row per layer: method, bits / sparsity / rank, parameters before and after, output SQNR on
calibration rows, and any fallback taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.calibration import InputStats, cached_stats
from slimgraph.compiler.errors import CalibrationError, NonFiniteWeightError
from slimgraph.compiler.ir import Function, Module, Node, Weight
from slimgraph.compiler.recipe import Recipe
from slimgraph.passes._linear import LinearLayer, find_linear_layers
from slimgraph.passes._rewrite import Rewriter


REPORT_SAMPLES = 4


@dataclass
class CompressionContext:
    """The recipe plus a lazy source of calibration batches (None: no calibration data)."""

    recipe: Recipe
    load_batches: Callable[[], list] | None = None
    explicit: bool = False          # the user named the calibration data (errors in it are never skipped)
    _batches: list | None = field(default=None, repr=False)

    def batches(self, why: str) -> list:
        if self.load_batches is None:
            raise CalibrationError(f"{why} needs calibration data, and none is available for this model; "
                                   "pass --calib FILE (text or .npz)")
        if self._batches is None:
            self._batches = list(self.load_batches())
            if not self._batches:
                raise CalibrationError(f"{why}: calibration data is empty")
        return self._batches

    def stats(self, module: Module, values, why: str) -> dict[str, InputStats]:
        return cached_stats(module, self.batches(why), values)

    def optional_stats(self, module: Module, values) -> dict[str, InputStats]:
        """Statistics on the first REPORT_SAMPLES calibration windows when calibration data exists
        (for the report's SQNR of methods that need no calibration), else empty."""
        if self.load_batches is None:
            return {}
        try:
            return cached_stats(module, self.batches("the output-error report")[:REPORT_SAMPLES], values)
        except CalibrationError:
            if self.explicit:
                raise
            self.load_batches = None   # e.g. no tokenizer for the built-in text: report without SQNR
            return {}


def select_layers(module: Module, recipe: Recipe, step: str) -> list[tuple[LinearLayer, object]]:
    """(layer, settings) for every linear layer the recipe applies ``step`` to."""
    chosen = []
    for layer in find_linear_layers(module):
        settings = recipe.settings_for(step, layer.name)
        if settings is not None:
            chosen.append((layer, settings))
    return chosen


def weight_matrix(module: Module, layer: LinearLayer) -> np.ndarray:
    """The layer's [K, N] weight as float32, refusing NaN / infinity (named in the error)."""
    w = np.asarray(module.weights[layer.weight].array, np.float32)
    if not np.all(np.isfinite(w)):
        bad = int(np.count_nonzero(~np.isfinite(w)))
        raise NonFiniteWeightError(f"weight {layer.weight} of layer {layer.name} has {bad} NaN/inf value(s); "
                                   "cannot compress it")
    return w


class Replacement(Protocol):
    """How the readers of one replaced weight compute its value from the new weights."""

    def matmul(self, rw: Rewriter, node: Node, x: str) -> str: ...

    def take(self, rw: Rewriter, node: Node) -> str | None: ...


def rewrite_readers(module: Module, weights: dict[str, Weight], replacements: dict[str, Replacement]) -> Module:
    """Rebuild every entry function, routing each reader of a weight in ``replacements`` through
    its replacement (``matmul(x, @W)`` and ``take(@W, ids)``); replaced weights nothing reads any
    more are dropped."""
    functions = dict(module.functions)
    for fn in module.entries:
        functions[fn.name] = _rewrite_function(module, fn, weights, replacements)
    new = Module(functions, weights, module.metadata)
    unread = set(replacements) - new.used_weights()
    return new.with_weights({k: v for k, v in weights.items() if k not in unread})


def _rewrite_function(module: Module, fn: Function, weights: dict, replacements: dict) -> Function:
    rw = Rewriter(module, fn, weights)
    for node in fn.nodes:
        ref = node.inputs[1] if node.op is ops.MATMUL and len(node.inputs) == 2 else node.inputs[0] if node.inputs else ""
        repl = replacements.get(ref[1:]) if ref.startswith("@") else None
        new = None
        if repl is not None and node.op is ops.MATMUL and node.inputs[1] == ref:
            new = repl.matmul(rw, node, rw.ref(node.inputs[0]))
        elif repl is not None and node.op is ops.TAKE and node.inputs[0] == ref:
            new = repl.take(rw, node)
        if new is None:
            rw.keep(node)
        elif new != node.name:
            rw.replace(node, new)
    return rw.finish()


def layer_row(layer: LinearLayer, method: str, params_after: int, sqnr: float | None, **extra) -> dict:
    row = {"layer": layer.name, "weight": layer.weight, "shape": [layer.k, layer.n], "method": method,
           "params_before": layer.params, "params_after": int(params_after),
           "sqnr_db": None if sqnr is None or not np.isfinite(sqnr) else round(float(sqnr), 2)}
    row.update(extra)
    return row


def summarize(rows: list[dict], **totals) -> dict:
    """The pass's stats: totals over layers plus the rows."""
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    return {"layers_changed": len(rows), "params_before": before, "params_after": after, **totals, "layers": rows}

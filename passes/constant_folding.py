"""Constant folding: evaluate at compile time every node whose inputs are all known.

Known values are weights, source ops (``constant``, ``arange``) with static shapes, and -- by
induction -- pure nodes whose inputs are all known and whose type is static. Each is evaluated
once with the op's numpy reference. Only the *frontier* is materialized: a known value used by
a node that stays (or returned by the function). Known values used only by other known values
vanish, so the Hugging Face causal-mask subgraph (arange, comparisons, cumsum, where, expand)
becomes one weight when shapes are static. With a symbolic ``T`` nothing in it is known and it
is left to the backend.

How a frontier value is materialized:
  * a source node stays an op (a scalar ``constant`` is cheaper than a weight);
  * a uniform result (all elements equal, e.g. ``broadcast_to`` of a scalar) becomes a
    ``constant`` op with that shape -- no bytes stored;
  * anything else becomes a weight named ``<W>.T`` / ``<W>.<op>`` when derived from a single
    weight ``W``, else ``fold.<content hash>`` (deterministic across runs);
  * a non-uniform known *output* of the function keeps its node (outputs stay computed values).

Size rule: a node is folded only if its result is at most ``FOLD_MIN_BYTES`` (4 MiB) or at most
``FOLD_GROWTH`` (4x) the bytes of its largest input, so folding never turns a scalar broadcast
into a huge array (a [1,32,2048,2048] mask stays an op). ``transpose``/``cast`` of a weight always
pass (same size or a dtype widening).
"""

from __future__ import annotations

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.ir import Function, Module, Node, Weight
from slimgraph.compiler.ops import CALL, CONSTANT, OpCategory, RefContext
from slimgraph.compiler.passmanager import PassResult, register_pass
from slimgraph.passes._rewrite import Rewriter, add_weight

FOLD_MIN_BYTES = 4 << 20
FOLD_GROWTH = 4


def weight_suffix(node: Node) -> str:
    """Suffix naming a weight derived by one op: ``T`` for a 2-D transpose, else the op name."""
    if node.op is ops.TRANSPOSE and tuple(node.attrs["perm"]) == (1, 0):
        return "T"
    if node.op is ops.CAST:
        return node.attrs["dtype"].value
    return node.op.name


def uniform_value(array: np.ndarray) -> float | None:
    """The single value of a non-empty array whose elements are all equal, if it survives as float."""
    if array.size == 0 or array.dtype.kind not in "biuf":
        return None
    first = array.flat[0]
    if array.flat[-1] != first or array.flat[array.size // 2] != first or not np.all(array == first):
        return None
    if array.dtype.kind == "f" and np.isnan(first):
        return None
    value = float(first)
    return value if np.asarray(value).astype(array.dtype) == first else None


class _Folder:
    """Evaluates known nodes of one function and rebuilds it."""

    def __init__(self, module: Module, fn: Function, weights: dict[str, Weight]):
        self.module, self.fn, self.weights = module, fn, weights
        self.values: dict[str, np.ndarray] = {}   # known node values
        self.origin: dict[str, str] = {}          # known value -> weight it derives from alone
        self.stats = {"nodes_folded": 0, "weights_created": 0, "constants_created": 0}

    def array_of(self, ref: str) -> np.ndarray | None:
        if ref.startswith("@"):
            w = self.weights.get(ref[1:])
            return w.array if w is not None and w.has_data else None
        return self.values.get(ref)

    def small_enough(self, node: Node, inputs: list[np.ndarray]) -> bool:
        out_bytes = node.type.nbytes()
        biggest = max((a.nbytes for a in inputs), default=0)
        return out_bytes <= max(FOLD_MIN_BYTES, FOLD_GROWTH * biggest)

    def evaluate(self, node: Node) -> None:
        """Record the value of ``node`` if it is known."""
        if not (node.op.pure and node.op.foldable) or node.op is CALL or not node.type.is_static:
            return
        inputs = [self.array_of(i) for i in node.inputs]
        if any(a is None for a in inputs) or not self.small_enough(node, inputs):
            return
        ctx = RefContext(node.type.shape, node.type.dtype, {})
        try:
            self.values[node.name] = np.asarray(node.op.reference(inputs, node.attrs, ctx))
        except (ValueError, IndexError, TypeError, KeyError):
            return   # fails on these constants: leave it for run time, where it reports properly
        sources = {self.origin.get(i, i[1:] if i.startswith("@") else None) for i in node.inputs}
        sources.discard(None)
        consts = [i for i in node.inputs if not i.startswith("@") and i not in self.origin]
        if len(sources) == 1 and not consts:
            base = sources.pop()
            self.origin[node.name] = f"{base}.{weight_suffix(node)}"

    def stays(self) -> set[str]:
        """Nodes emitted in the new function (walking backwards so users decide first)."""
        emitted: set[str] = set()
        used_by_emitted = set(self.fn.outputs)
        for node in reversed(self.fn.nodes):
            known = node.name in self.values
            source = node.op.category is OpCategory.SOURCE
            needed = node.name in used_by_emitted
            if not known or (needed and (source or self._kept_output(node))):
                emitted.add(node.name)
                used_by_emitted.update(node.inputs)
            elif needed:
                emitted.add(node.name)   # materialized as a constant op or a weight
        return emitted

    def _kept_output(self, node: Node) -> bool:
        return node.name in self.fn.outputs and uniform_value(self.values[node.name]) is None

    def rebuild(self) -> Function:
        for node in self.fn.nodes:
            self.evaluate(node)
        emitted = self.stays()
        rw = Rewriter(self.module, self.fn, self.weights)
        for node in self.fn.nodes:
            known = node.name in self.values
            if node.name not in emitted:
                self.stats["nodes_folded"] += known
                continue
            if not known or node.op.category is OpCategory.SOURCE or self._kept_output(node):
                rw.keep(node)
            else:
                self.materialize(rw, node)
        return rw.finish()

    def materialize(self, rw: Rewriter, node: Node) -> None:
        self.stats["nodes_folded"] += 1
        array = self.values[node.name]
        value = uniform_value(array)
        if value is not None:
            rw.add(CONSTANT, (), {"value": value, "dtype": node.type.dtype, "shape": node.type.shape},
                   name=node.name)
            self.stats["constants_created"] += 1
            return
        array = np.asarray(array, order="C")
        hint = self.origin.get(node.name) or f"fold.{Weight(array).digest[:8]}"
        before = len(self.weights)
        ref = add_weight(self.weights, hint, array)
        self.stats["weights_created"] += len(self.weights) - before
        rw.replace(node, ref)


@register_pass("fold_constants")
def fold_constants(module: Module) -> PassResult:
    """Evaluate nodes whose inputs are all constants; big results (see FOLD_MIN_BYTES) stay ops."""
    weights = dict(module.weights)
    functions, totals = {}, {"nodes_folded": 0, "weights_created": 0, "constants_created": 0}
    for name, fn in module.functions.items():
        folder = _Folder(module, fn, weights)
        functions[name] = folder.rebuild()
        for k, v in folder.stats.items():
            totals[k] += v
    if not totals["nodes_folded"]:
        return PassResult(module, False, totals)
    return PassResult(Module(functions, weights, module.metadata), True, totals)


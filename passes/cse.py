"""Common-subexpression elimination.

Two pure nodes compute the same value when they apply the same op with the same attributes to
the same inputs and have the same type. Walking each function in order, a node is keyed by
``(op, inputs, attrs, type)`` -- inputs already renamed to their surviving equivalents, and
sorted for commutative ops (``add(a, b)`` == ``add(b, a)``) -- and a node whose key was seen
before is replaced by the earlier one. One walk suffices: inputs are canonical before their users.

Identical weights (same type and content digest, confirmed element by element) are merged into
the one with the smallest name; references are redirected and the duplicates dropped.
"""

from __future__ import annotations

import numpy as np

from slimgraph.compiler.ir import Function, Module, Weight
from slimgraph.compiler.passmanager import PassResult, register_pass
from slimgraph.passes._rewrite import Rewriter


def duplicate_weights(module: Module) -> dict[str, str]:
    """Map each referenced weight that duplicates another to the canonical (smallest) name."""
    groups: dict[tuple, list[str]] = {}
    for name in sorted(module.used_weights()):
        w = module.weights.get(name)
        if w is not None and w.has_data:
            groups.setdefault((w.type, w.digest), []).append(name)
    merged: dict[str, str] = {}
    for names in groups.values():
        keeper = names[0]
        for other in names[1:]:
            if np.array_equal(module.weights[keeper].array, module.weights[other].array, equal_nan=True):
                merged[other] = keeper
    return merged


def _key(node, inputs: tuple) -> tuple:
    if node.op.commutative:
        inputs = tuple(sorted(inputs))
    return (node.op, inputs, node.attrs, node.type)


def eliminate(module: Module, fn: Function, weights: dict[str, Weight], merged: dict[str, str]) -> tuple:
    """CSE over one function; returns (new function, number of nodes removed)."""
    rw = Rewriter(module, fn, weights)
    rw.subst.update({f"@{a}": f"@{b}" for a, b in merged.items()})
    seen: dict[tuple, str] = {}
    removed = 0
    for node in fn.nodes:
        inputs = rw.inputs(node)
        key = _key(node, inputs) if node.op.pure else None
        if key is not None and key in seen and rw.replace(node, seen[key]):
            removed += 1
            continue
        rw.keep(node)
        if key is not None:
            seen.setdefault(key, node.name)
    return rw.finish(), removed


@register_pass("cse")
def common_subexpression_elimination(module: Module) -> PassResult:
    """Merge pure nodes computing the same op on the same inputs, and identical weights."""
    merged = duplicate_weights(module)
    weights = {n: w for n, w in module.weights.items() if n not in merged}
    functions, removed = {}, 0
    for name, fn in module.functions.items():
        functions[name], count = eliminate(module, fn, weights, merged)
        removed += count
    stats = {"nodes_merged": removed, "weights_merged": len(merged)}
    if not removed and not merged:
        return PassResult(module, False, stats)
    return PassResult(Module(functions, weights, module.metadata), True, stats)

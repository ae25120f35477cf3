"""Shared machinery for passes that rebuild a function node by node without touching their input.

A pass walks the old function in order and, for every node, either *keeps* it (with its inputs
renamed through the substitution map), *replaces* it by an existing value (``x * 1`` -> ``x``), or
*emits* new nodes. Names of old nodes are reserved, so a new node never steals the name of a
node that comes later; a replacement node may take over the name of the node it replaces.

Weights: :func:`add_weight` adds a derived constant under a deterministic name (``W.T``) and
reuses an existing weight of that name when the content is identical, so re-running a pass
yields the same module.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from slimgraph.compiler.errors import InternalError
from slimgraph.compiler.ir import Function, FunctionBuilder, Module, Node, Weight, sanitize_name
from slimgraph.compiler.ops import OpDef
from slimgraph.compiler.types import TensorType


class _Builder(FunctionBuilder):
    """A FunctionBuilder whose fresh names also avoid a reserved set (names of old nodes)."""

    def __init__(self, *args, reserved: set[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.reserved = reserved

    def fresh(self, hint: str) -> str:
        base = sanitize_name(hint)
        name, n = base, 0
        while name in self.types or name in self.reserved:
            n += 1
            name = f"{base}_{n}"
        return name


class Rewriter:
    """Rebuilds ``fn`` of ``module``; ``weights`` is the pass's own (mutable) copy of the weights."""

    def __init__(self, module: Module, fn: Function, weights: dict[str, Weight] | None = None):
        self.module = module
        self.fn = fn
        self.weights = weights if weights is not None else dict(module.weights)
        self.subst: dict[str, str] = {}
        self.outputs = set(fn.outputs)
        self.builder = _Builder(fn.name, self.weights, fn.kind, module.functions,
                                reserved={n.name for n in fn.nodes})
        self.nodes: dict[str, Node] = {}
        for p in fn.params:
            self.builder.params.append(p)
            self.builder.types[p.name] = p.type

    # ------------------------------------------------------------------ lookups in the new function
    def ref(self, name: str) -> str:
        """The current name of an old value (follows replacements)."""
        while name in self.subst:
            name = self.subst[name]
        return name

    def inputs(self, node: Node) -> tuple:
        return tuple(self.ref(i) for i in node.inputs)

    def producer(self, ref: str) -> Node | None:
        """The new node defining ``ref`` (None for params and weights)."""
        return self.nodes.get(ref)

    def type_of(self, ref: str) -> TensorType:
        return self.builder.type_of(ref)

    def weight_array(self, ref: str) -> np.ndarray | None:
        """The data of ``ref`` if it names a loaded weight."""
        if ref.startswith("@"):
            w = self.weights.get(ref[1:])
            if w is not None and w.has_data:
                return w.array
        return None

    # ------------------------------------------------------------------ emitting
    def keep(self, node: Node) -> str:
        """Emit ``node`` under its own name with renamed inputs."""
        inputs = self.inputs(node)
        new = node if inputs == node.inputs else Node(node.name, node.op, inputs, node.attrs, node.type)
        self.builder.reserved.discard(node.name)
        self.builder.append_node(new)
        self.nodes[new.name] = new
        return new.name

    def add(self, op: OpDef, inputs: Iterable[str], attrs: dict | None = None, *, name: str,
            type: TensorType | None = None) -> str:
        """Emit a new node; ``name`` is a hint (pass the replaced node's name to keep it)."""
        self.builder.reserved.discard(name)
        value = self.builder.add(op, inputs, attrs, name=name, type=type)
        self.nodes[value] = self.builder.nodes[-1]
        return value

    def replace(self, node: Node, ref: str) -> bool:
        """Make later uses of ``node`` read ``ref``. A function output is never redirected to a
        weight or a param (outputs stay computed values); returns False when refused."""
        if ref == node.name:
            return True
        if node.name in self.outputs and (ref.startswith("@") or ref not in self.nodes):
            return False
        self.subst[node.name] = ref
        return True

    def finish(self) -> Function:
        outputs = tuple(self.ref(o) for o in self.fn.outputs)
        for o in outputs:
            if o.startswith("@"):
                raise InternalError(f"@{self.fn.name}: an output was rewritten to weight {o}")
        self.builder.output(*outputs)
        return self.builder.build()


def add_weight(weights: dict[str, Weight], hint: str, array: np.ndarray) -> str:
    """Store ``array`` as a weight named ``hint`` (or ``hint_1``, ...); returns ``@name``.
    An existing weight with the same name and content is reused."""
    new = Weight(array)
    base = sanitize_name(hint)
    name, n = base, 0
    while name in weights:
        old = weights[name]
        if old.type == new.type and old.has_data and old.digest == new.digest:
            return f"@{name}"
        n += 1
        name = f"{base}_{n}"
    weights[name] = new
    return f"@{name}"


def scalar_value(rw: Rewriter, ref: str) -> float | None:
    """The value of ``ref`` if it is a uniform constant: a ``constant`` op or a one-element weight."""
    from slimgraph.compiler.ops import CONSTANT

    node = rw.producer(ref)
    if node is not None and node.op is CONSTANT:
        return node.attrs["value"]
    array = rw.weight_array(ref)
    if array is not None and array.size == 1:
        return float(array.reshape(-1)[0])
    return None

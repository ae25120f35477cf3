"""slimgraph's IR: typed SSA functions over named weights, grouped in a module.

* A :class:`Module` maps names to :class:`Function` s (entry points such as ``main``, ``prefill`` and
  ``decode``, plus the ``fused`` functions that operator fusion creates) and holds the weights.
* A :class:`Function` has typed params, a topologically ordered tuple of :class:`Node` s and outputs.
  Every node defines exactly one value named like the node.
* Inputs are strings: a value name, or ``@name`` for a weight of the module.
* Everything is immutable: passes build new functions with :class:`FunctionBuilder` and share the
  weight arrays (numpy, memory-mapped where possible) instead of copying them.
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Iterable, Mapping

import numpy as np

from slimgraph.compiler.ops import Attrs, OpDef
from slimgraph.compiler.ops import CALL
from slimgraph.compiler.types import TensorType

_NAME_RE = re.compile(r"[^A-Za-z0-9_.]")


def sanitize_name(name: str) -> str:
    """Make an arbitrary source name (ONNX ``/enc/Add_1:0``) a printable IR identifier."""
    out = _NAME_RE.sub("_", name).strip("._") or "v"
    return out if not out[0].isdigit() else f"v{out}"


class Weight:
    """A named constant tensor. ``array`` may be None for a weight known only by its type and
    digest (an IR text parsed without its weight file)."""

    __slots__ = ("type", "_array", "_digest")

    def __init__(self, array: np.ndarray | None, *, type: TensorType | None = None, digest: str | None = None):
        if array is not None and type is None:
            type = TensorType.of(array)
        self.type = type
        self._array = array
        self._digest = digest

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            raise ValueError("weight data is not loaded (IR parsed from text without weights)")
        return self._array

    @property
    def has_data(self) -> bool:
        return self._array is not None

    @property
    def digest(self) -> str:
        """Short content hash (first 12 hex digits of blake2b) shown by the printer."""
        if self._digest is None:
            data = np.asarray(self._array, order="C")
            h = hashlib.blake2b(digest_size=16)
            h.update(str(self.type).encode())
            h.update(memoryview(data.reshape(-1).view(np.uint8)))
            self._digest = h.hexdigest()[:12]
        return self._digest

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.type.shape, dtype=np.int64)) * self.type.dtype.itemsize


class FunctionKind(enum.Enum):
    ENTRY = "func"
    FUSED = "fused"


@dataclass(frozen=True)
class Param:
    name: str
    type: TensorType


@dataclass(frozen=True, eq=False)
class Node:
    name: str
    op: OpDef
    inputs: tuple
    attrs: Attrs
    type: TensorType

    def attr(self, key):
        return self.attrs[key]

    @property
    def callee(self) -> str | None:
        return self.attrs["callee"] if self.op is CALL else None

    def key(self) -> tuple:
        """Structural identity (op, inputs, attrs, type) used by CSE."""
        return (self.op.name, self.inputs, self.attrs, self.type)


@dataclass(frozen=True)
class Function:
    name: str
    params: tuple
    nodes: tuple
    outputs: tuple
    kind: FunctionKind = FunctionKind.ENTRY

    def node_map(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def value_types(self, module: "Module") -> dict[str, TensorType]:
        types = {p.name: p.type for p in self.params}
        types.update((n.name, n.type) for n in self.nodes)
        for n in self.nodes:
            for i in n.inputs:
                if i.startswith("@") and i[1:] in module.weights:
                    types[i] = module.weights[i[1:]].type
        return types

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def output_types(self) -> tuple[TensorType, ...]:
        types = {p.name: p.type for p in self.params}
        types.update((n.name, n.type) for n in self.nodes)
        return tuple(types[o] for o in self.outputs)

    def weight_refs(self) -> set[str]:
        return {i[1:] for n in self.nodes for i in n.inputs if i.startswith("@")}


@dataclass(frozen=True)
class Module:
    functions: Mapping[str, Function]
    weights: Mapping[str, Weight]
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "functions", MappingProxyType(dict(self.functions)))
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def entries(self) -> list[Function]:
        return [f for f in self.functions.values() if f.kind is FunctionKind.ENTRY]

    @property
    def main(self) -> Function:
        return self.entries[0]

    def with_functions(self, functions: Mapping[str, Function]) -> "Module":
        return replace(self, functions=functions)

    def with_function(self, fn: Function) -> "Module":
        functions = dict(self.functions)
        functions[fn.name] = fn
        return replace(self, functions=functions)

    def with_weights(self, weights: Mapping[str, Weight]) -> "Module":
        return replace(self, weights=weights)

    def used_weights(self) -> set[str]:
        out: set[str] = set()
        for f in self.functions.values():
            out |= f.weight_refs()
        return out

    def weight_bytes(self) -> int:
        return sum(self.weights[w].nbytes for w in self.used_weights() if w in self.weights)

    def num_nodes(self) -> int:
        return sum(len(f.nodes) for f in self.functions.values())

    def num_kernels(self) -> int:
        """Kernels a build emits: one per node of an entry function that computes something
        (a call to a fused function counts once; pure reshapes are free views)."""
        from slimgraph.compiler.ops import RESHAPE

        return sum(1 for f in self.entries for n in f.nodes if n.op is not RESHAPE)


class FunctionBuilder:
    """Builds a :class:`Function` node by node, inferring types and keeping names unique."""

    def __init__(self, name: str, module_weights: Mapping[str, Weight] | None = None,
                 kind: FunctionKind = FunctionKind.ENTRY, functions: Mapping[str, Function] | None = None):
        self.name = name
        self.kind = kind
        self.params: list[Param] = []
        self.nodes: list[Node] = []
        self.outputs: tuple = ()
        self.types: dict[str, TensorType] = {}
        self.weights = module_weights if module_weights is not None else {}
        self.functions = functions if functions is not None else {}
        self._counts: dict[str, int] = {}

    def fresh(self, hint: str) -> str:
        base = sanitize_name(hint)
        name, n = base, self._counts.get(base, 0)
        while name in self.types:
            n += 1
            name = f"{base}_{n}"
        self._counts[base] = n
        return name

    def param(self, name: str, type: TensorType) -> str:
        name = self.fresh(name)
        self.params.append(Param(name, type))
        self.types[name] = type
        return name

    def type_of(self, ref: str) -> TensorType:
        if ref.startswith("@"):
            return self.weights[ref[1:]].type
        return self.types[ref]

    def add(self, op: OpDef, inputs: Iterable[str] = (), attrs: dict | None = None, *, name: str | None = None,
            type: TensorType | None = None) -> str:
        """Append a node; its type is inferred by the op unless given (calls take the callee's)."""
        inputs = tuple(inputs)
        attr_obj = op.make_attrs(attrs, where=f"node {name or op.name}: ")
        if type is None:
            in_types = [self.type_of(i) for i in inputs]
            if op is CALL:
                type = self.functions[attr_obj["callee"]].output_types()[0]
            else:
                type = op.infer(in_types, attr_obj)
        value = self.fresh(name or op.name)
        self.nodes.append(Node(value, op, inputs, attr_obj, type))
        self.types[value] = type
        return value

    def append_node(self, node: Node) -> str:
        """Append an already-built node, keeping its name (it must be fresh)."""
        if node.name in self.types:
            raise ValueError(f"value %{node.name} defined twice in @{self.name}")
        self.nodes.append(node)
        self.types[node.name] = node.type
        return node.name

    def output(self, *names: str) -> None:
        self.outputs = tuple(names)

    def build(self) -> Function:
        return Function(self.name, tuple(self.params), tuple(self.nodes), self.outputs, self.kind)


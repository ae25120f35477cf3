"""The op registry: every op kind the IR knows, with typed attributes, type inference,
purity and a numpy reference implementation.

An :class:`OpDef` is a singleton object; passes compare ops by identity (``node.op is ops.MATMUL``)
or by :class:`OpCategory`, never by name strings. The name is only used to print and parse.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from slimgraph.compiler.types import DType, Dim, TensorType, eval_dim


class OpCategory(enum.Enum):
    """How an op behaves for fusion and scheduling."""

    ELEMENTWISE = "elementwise"   # out[i] = f(in[i]) with broadcasting
    LAYOUT = "layout"             # pure data movement / indexing (reshape, transpose, slice, take)
    REDUCTION = "reduction"       # reduces one or more axes
    NORMALIZATION = "normalization"  # softmax / layer norm / rms norm: reduce then elementwise
    CONTRACTION = "contraction"   # matmul / conv: the heavy kernels
    SOURCE = "source"             # creates data from attributes only (constant, arange, full)
    CACHE = "cache"               # reads or writes a key/value cache in place: a kernel of its own, never fused
    CALL = "call"                 # calls another function of the module (fused groups)


class AttrKind(enum.Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STR = "str"
    INTS = "ints"
    DIM = "dim"       # an int or a symbolic expression
    DIMS = "dims"     # a shape, possibly symbolic
    DTYPE = "dtype"


@dataclass(frozen=True)
class AttrSpec:
    name: str
    kind: AttrKind
    default: Any = None
    required: bool = False

    def coerce(self, value):
        """Validate and normalize a value for this attribute (raises TypeError when wrong)."""
        k = self.kind
        if k is AttrKind.INT:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"attribute {self.name} wants an int, got {value!r}")
            return int(value)
        if k is AttrKind.FLOAT:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"attribute {self.name} wants a float, got {value!r}")
            return float(value)
        if k is AttrKind.BOOL:
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"attribute {self.name} wants a bool, got {value!r}")
            return bool(value)
        if k is AttrKind.STR:
            if not isinstance(value, str):
                raise TypeError(f"attribute {self.name} wants a string, got {value!r}")
            return value
        if k is AttrKind.INTS:
            return tuple(int(v) for v in value)
        if k is AttrKind.DIM:
            return _coerce_dim(value)
        if k is AttrKind.DIMS:
            return tuple(_coerce_dim(v) for v in value)
        if k is AttrKind.DTYPE:
            return value if isinstance(value, DType) else DType(value)
        raise AssertionError(k)


def _coerce_dim(value) -> Dim:
    from slimgraph.compiler.types import canonical_dim

    return canonical_dim(int(value) if isinstance(value, (int, np.integer)) else str(value))


class Attrs:
    """An immutable, validated attribute set; iteration order follows the op's spec."""

    __slots__ = ("_items",)

    def __init__(self, items: tuple):
        self._items = items

    def __getitem__(self, key):
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def get(self, key, default=None):
        for k, v in self._items:
            if k == key:
                return v
        return default

    def items(self):
        return self._items

    def __eq__(self, other):
        return isinstance(other, Attrs) and self._items == other._items

    def __hash__(self):
        return hash(self._items)

    def __repr__(self):
        return f"Attrs({dict(self._items)!r})"


@dataclass
class RefContext:
    """What a reference implementation gets besides its inputs: the concrete output shape
    and the values of the symbolic dims in scope."""

    out_shape: tuple
    out_dtype: DType
    env: dict = field(default_factory=dict)

    def dim(self, d: Dim) -> int:
        return eval_dim(d, self.env)


InferFn = Callable[[Sequence[TensorType], Attrs], TensorType]
RefFn = Callable[[Sequence[np.ndarray], Attrs, RefContext], np.ndarray]


@dataclass(eq=False)
class OpDef:
    """One op kind. ``arity`` is the number of inputs (None for variadic). ``foldable=False`` keeps
    constant folding away from an op even when all its inputs are weights (``dequantize``: folding
    it would store the full-precision matrix the quantization was meant to remove)."""

    name: str
    category: OpCategory
    infer: InferFn
    reference: RefFn
    attrs: tuple = ()
    arity: int | tuple | None = 1
    pure: bool = True
    foldable: bool = True
    commutative: bool = False
    doc: str = ""

    def make_attrs(self, values: dict | None, *, where: str = "") -> Attrs:
        values = dict(values or {})
        items = []
        for spec in self.attrs:
            if spec.name in values and values[spec.name] is None and not spec.required:
                values.pop(spec.name)
                items.append((spec.name, spec.default))
            elif spec.name in values:
                items.append((spec.name, spec.coerce(values.pop(spec.name))))
            elif spec.required:
                raise TypeError(f"{where}op {self.name} needs attribute {spec.name}")
            else:
                items.append((spec.name, spec.default))
        if values:
            raise TypeError(f"{where}op {self.name} has no attribute(s) {sorted(values)}")
        return Attrs(tuple(items))

    def check_arity(self, n: int) -> bool:
        if self.arity is None:
            return n >= 1
        if isinstance(self.arity, tuple):
            return n in self.arity
        return n == self.arity

    def __repr__(self):
        return f"<op {self.name}>"


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in OPS:
        raise ValueError(f"op {op.name} registered twice")
    OPS[op.name] = op
    return op


def lookup(name: str) -> OpDef | None:
    return OPS.get(name)

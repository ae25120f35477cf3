"""Tensor types of slimgraph's IR: a dtype and a shape whose dims are ints or symbolic expressions.

A symbolic dim is kept as the canonical text of a sympy expression over named symbols
(``"T"``, ``"9*T"``, ``"T + 1"``), so types are hashable, print deterministically and parse back.
Arithmetic on dims goes through sympy, which simplifies products and sums for reshape checks.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import Union

import numpy as np
import sympy

Dim = Union[int, str]

_SYMBOL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DType(enum.Enum):
    """Element types the IR knows; the value is the short printed name."""

    f16 = "f16"
    f32 = "f32"
    f64 = "f64"
    i8 = "i8"
    u8 = "u8"
    i16 = "i16"
    i32 = "i32"
    i64 = "i64"
    u32 = "u32"
    bool = "bool"

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(_TO_NUMPY[self])

    @property
    def is_float(self) -> bool:
        return self in (DType.f16, DType.f32, DType.f64)

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @classmethod
    def from_numpy(cls, dtype) -> "DType":
        key = np.dtype(dtype)
        for member, name in _TO_NUMPY.items():
            if np.dtype(name) == key:
                return member
        raise ValueError(f"numpy dtype {key} has no slimgraph equivalent")

    def __str__(self) -> str:
        return self.value


_TO_NUMPY = {
    DType.f16: "float16", DType.f32: "float32", DType.f64: "float64", DType.i8: "int8",
    DType.u8: "uint8", DType.i16: "int16", DType.i32: "int32", DType.i64: "int64",
    DType.u32: "uint32", DType.bool: "bool",
}


# ----------------------------------------------------------------------------- symbolic dims
@functools.lru_cache(maxsize=4096)
def dim_expr(dim: Dim) -> sympy.Expr:
    """The sympy expression of a dim (all symbols are positive integers)."""
    if isinstance(dim, (int, np.integer)):
        return sympy.Integer(int(dim))
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", dim))
    local = {n: sympy.Symbol(n, integer=True, positive=True) for n in names}
    return sympy.sympify(dim, locals=local)


@functools.lru_cache(maxsize=4096)
def canonical_dim(expr) -> Dim:
    """Turn a sympy expression (or int/str) into the canonical Dim: an int or compact text."""
    if isinstance(expr, (int, np.integer)):
        return int(expr)
    if isinstance(expr, str):
        expr = dim_expr(expr)
    expr = sympy.simplify(expr)
    if expr.is_Integer:
        return int(expr)
    return str(expr).replace(" ", "")


def dim_mul(*dims: Dim) -> Dim:
    out = sympy.Integer(1)
    for d in dims:
        out = out * dim_expr(d)
    return canonical_dim(out)


def dim_add(a: Dim, b: Dim) -> Dim:
    return canonical_dim(dim_expr(a) + dim_expr(b))


def dim_sub(a: Dim, b: Dim) -> Dim:
    return canonical_dim(dim_expr(a) - dim_expr(b))


def dim_floordiv(a: Dim, b: Dim) -> Dim:
    return canonical_dim(sympy.floor(dim_expr(a) / dim_expr(b)))


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.simplify(dim_expr(a) - dim_expr(b)) == 0


def is_static(dim: Dim) -> bool:
    return isinstance(dim, int)


def dim_symbols(dim: Dim) -> set[str]:
    if isinstance(dim, int):
        return set()
    return {s.name for s in dim_expr(dim).free_symbols}


def eval_dim(dim: Dim, env: dict[str, int]) -> int:
    """Evaluate a dim given values of its symbols."""
    if isinstance(dim, int):
        return dim
    expr = dim_expr(dim)
    value = expr.subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in env.items()})
    if not value.is_Integer:
        raise KeyError(f"dim {dim!r} has unbound symbols {sorted(dim_symbols(dim) - set(env))}")
    return int(value)


def parse_dim(text: str) -> Dim:
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return canonical_dim(dim_expr(text))


# ----------------------------------------------------------------------------- tensor type
@dataclass(frozen=True)
class TensorType:
    """dtype + shape; ``str()`` gives ``f32[1,T,576]`` (a scalar is ``f32[]``)."""

    dtype: DType
    shape: tuple

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(canonical_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Dim:
        return dim_mul(*self.shape) if self.shape else 1

    def nbytes(self) -> Dim:
        return dim_mul(self.numel(), self.dtype.itemsize)

    def symbols(self) -> set[str]:
        out: set[str] = set()
        for d in self.shape:
            out |= dim_symbols(d)
        return out

    def concrete(self, env: dict[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, env) for d in self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    @classmethod
    def parse(cls, text: str) -> "TensorType":
        m = re.fullmatch(r"\s*([a-z0-9]+)\[(.*)\]\s*", text)
        if not m:
            raise ValueError(f"not a tensor type: {text!r}")
        dims = [parse_dim(p) for p in m.group(2).split(",")] if m.group(2).strip() else []
        return cls(DType(m.group(1)), tuple(dims))

    @classmethod
    def of(cls, array: np.ndarray) -> "TensorType":
        return cls(DType.from_numpy(array.dtype), tuple(int(d) for d in array.shape))


def broadcast_shapes(*shapes: tuple) -> tuple:
    """numpy broadcasting over possibly-symbolic dims; raises ValueError on a mismatch."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        chosen: Dim = 1
        for d in dims:
            if d == 1:
                continue
            if chosen == 1:
                chosen = d
            elif not dims_equal(chosen, d):
                raise ValueError(f"shapes {' vs '.join(_fmt(s) for s in shapes)} do not broadcast")
        out.append(chosen)
    return tuple(out)


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"

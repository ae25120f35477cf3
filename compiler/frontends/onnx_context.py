"""Conversion state shared by the ONNX op converters.

Every ONNX tensor becomes a :class:`Val`: an IR value (``ref``), a tensor known at import time
(``const``), or both. Known tensors are how shape subgraphs disappear: ``Shape(x)`` is known from
x's type, so ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` folds into a static reshape
attribute. A known tensor holding symbolic dims is a numpy *object* array of sympy expressions
(``[1, T, 384]``); arithmetic on it (``T * 6``, ``Equal(shape, -1)``) is evaluated by sympy with
all symbols positive integers, so comparisons such as ``T > 0`` resolve too.

Converters are small functions ``convert(ctx) -> Val | list[Val]`` registered in
:data:`CONVERTERS` by ONNX op_type with :func:`converter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import sympy

from slimgraph.compiler import ops
from slimgraph.compiler.errors import ShapeMismatchError, UnsupportedError
from slimgraph.compiler.ir import FunctionBuilder, Weight, sanitize_name
from slimgraph.compiler.types import DType, TensorType, canonical_dim, dim_expr

CONVERTERS: dict[str, Callable] = {}
FOLD_LIMIT = 1 << 16  # tensors created at import time (ConstantOfShape, Range, Expand) stay this small


def converter(*op_types: str):
    """Register a converter for one or more ONNX op types."""
    def wrap(fn):
        for op_type in op_types:
            CONVERTERS[op_type] = fn
        return fn

    return wrap


@dataclass
class Val:
    """One ONNX tensor during import: its type, its IR value name and/or its known contents."""

    type: TensorType
    ref: str | None = None
    const: np.ndarray | None = None

    @property
    def shape(self) -> tuple:
        return self.type.shape

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def rank(self) -> int:
        return self.type.rank


# ----------------------------------------------------------------------------- symbolic arrays
def small_static(shape) -> bool:
    """Whether a tensor of this shape may be created at import time (static and at most FOLD_LIMIT)."""
    return all(isinstance(d, int) for d in shape) and int(np.prod(shape, dtype=np.int64)) <= FOLD_LIMIT


def normalize(arr: np.ndarray) -> np.ndarray:
    """Turn an object array whose entries are all plain integers (or booleans) back into int64 (bool)."""
    arr = np.asarray(arr)
    if arr.dtype != object:
        return arr
    flat = [sympy.sympify(v) for v in arr.reshape(-1)]
    if all(v.is_Integer for v in flat):
        return np.array([int(v) for v in flat], np.int64).reshape(arr.shape)
    if all(v in (sympy.true, sympy.false) for v in flat):
        return np.array([bool(v) for v in flat], np.bool_).reshape(arr.shape)
    out = np.empty(len(flat), object)
    out[:] = flat
    return out.reshape(arr.shape)


def dims_array(dims) -> np.ndarray:
    """A known int64 (or symbolic object) array from IR dims."""
    out = np.empty(len(dims), object)
    out[:] = [dim_expr(d) for d in dims]
    return normalize(out)


def as_dim(value, where: str):
    """An IR dim from a known value. Expressions with functions (floor(T/2), Max(T, 8)) have no IR
    form: the IR's dims are polynomials of the input symbols."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    expr = sympy.sympify(value)
    if expr.atoms(sympy.Function):
        raise UnsupportedError(f"{where}: the shape value {expr} is not a polynomial of the input dims; "
                               "fix those dims with import_onnx(..., shapes={...})")
    return canonical_dim(expr)


def to_dims(arr: np.ndarray, where: str) -> tuple:
    """IR dims (ints or canonical expression text) from a known 1-D shape array."""
    return tuple(as_dim(v, where) for v in np.asarray(arr).reshape(-1))


def symbolic_floordiv(a, b):
    """Integer division of known values (ONNX Div on ints truncates; dims are positive)."""
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        quotient = abs(int(a)) // abs(int(b))
        return quotient if (a >= 0) == (b > 0) else -quotient
    return sympy.floor(sympy.sympify(a) / sympy.sympify(b))


# ----------------------------------------------------------------------------- state
class ImportState:
    """Whole-graph state: the builder, the weights and the ONNX tensor -> Val map."""

    def __init__(self, source: str, opset: int):
        self.source = source
        self.opset = opset
        self.weights: dict[str, Weight] = {}
        self.builder = FunctionBuilder("main", self.weights)
        self.values: dict[str, Val] = {}

    def add_weight(self, hint: str, array: np.ndarray) -> str:
        """Store an array as a module weight under a unique sanitized name; returns ``@name``."""
        base = sanitize_name(hint)
        name, n = base, 0
        while name in self.weights:
            n += 1
            name = f"{base}_{n}"
        self.weights[name] = Weight(array)
        return "@" + name


class NodeContext:
    """What a converter sees: the node's inputs as Vals, its attributes, and emit/fold helpers."""

    def __init__(self, state: ImportState, node: onnx.NodeProto, display_name: str, attr_reader: Callable):
        self.state = state
        self.node = node
        self.name = display_name
        self.op_type = node.op_type
        self._read_attr = attr_reader
        self._attrs = {a.name: a for a in node.attribute}

    # -- inputs and attributes
    @property
    def where(self) -> str:
        return f"{self.state.source}: node {self.name!r} ({self.op_type})"

    @property
    def num_inputs(self) -> int:
        return len(self.node.input)

    def input(self, i: int) -> Val | None:
        """The i-th input, or None when it is absent or the empty name (an omitted optional input)."""
        if i >= len(self.node.input) or not self.node.input[i]:
            return None
        return self.state.values[self.node.input[i]]

    def inputs(self) -> list[Val | None]:
        return [self.input(i) for i in range(self.num_inputs)]

    def attr(self, key: str, default=None):
        proto = self._attrs.get(key)
        return default if proto is None else self._read_attr(proto, self)

    def known(self, i: int, what: str) -> np.ndarray:
        """Contents of input i, which must be computable at import time (a constant or shape value)."""
        val = self.input(i)
        if val is None or val.const is None:
            tensor = self.node.input[i] if i < len(self.node.input) else "<missing>"
            raise UnsupportedError(f"{self.where}: input {what} (tensor {tensor!r}) must be known at import "
                                   "time (a constant or a value computed from shapes), but depends on data")
        return val.const

    def known_ints(self, i: int, what: str) -> list[int]:
        arr = normalize(self.known(i, what))
        if arr.dtype == object:
            raise UnsupportedError(f"{self.where}: input {what} must be static integers, got {arr.tolist()}")
        return [int(v) for v in arr.reshape(-1)]

    def axes(self, input_index: int, attr_name: str = "axes") -> list[int] | None:
        """Axes given as an attribute (older opsets) or as an input (newer ones); None when absent."""
        if self.input(input_index) is not None:
            return self.known_ints(input_index, attr_name)
        value = self.attr(attr_name)
        return None if value is None else [int(v) for v in value]

    # -- results
    def const(self, array: np.ndarray, dtype: DType | None = None) -> Val:
        """A Val known at import time."""
        array = normalize(array)
        if dtype is None:
            dtype = DType.i64 if array.dtype == object else DType.from_numpy(array.dtype)
        elif array.dtype != object:
            array = array.astype(dtype.numpy, copy=False)
        return Val(TensorType(dtype, tuple(int(d) for d in array.shape)), const=array)

    def fold(self, fn: Callable, *vals: Val, dtype: DType | None = None) -> Val | None:
        """Evaluate ``fn`` on known inputs; None when some input is not known or evaluation needs data."""
        if any(v is None or v.const is None for v in vals):
            return None
        try:
            result = np.asarray(fn(*[v.const for v in vals]))
        except (TypeError, ValueError, AttributeError):
            return None  # e.g. an unresolvable symbolic comparison: fall back to emitting the op
        return self.const(result, dtype or vals[0].dtype)

    def emit(self, op, inputs: list[Val], attrs: dict | None = None, hint: str | None = None) -> Val:
        """Append an IR node; its type is inferred, and a shape error names this ONNX node."""
        refs = [self.ref(v) for v in inputs]
        hint = hint or (self.node.output[0] if self.node.output and self.node.output[0] else self.op_type)
        try:
            name = self.state.builder.add(op, refs, attrs, name=hint)
        except (ValueError, IndexError) as exc:
            shapes = ", ".join(str(v.type) for v in inputs)
            raise ShapeMismatchError(f"{self.where}: {exc} (inputs: {shapes})") from None
        return Val(self.state.builder.types[name], ref=name)

    def ref(self, val: Val) -> str:
        """The IR value for a Val, materializing a known tensor as a constant op or weight."""
        if val.ref is not None:
            return val.ref
        arr = val.const
        if arr.dtype == object:
            val.ref = self._symbolic_data(val)
            return val.ref
        flat = arr.reshape(-1)
        if flat.size and np.all(flat == flat[0]) and (arr.dtype.kind in "fb" or abs(int(flat[0])) < 2 ** 53):
            val.ref = self.state.builder.add(
                ops.CONSTANT, (), {"value": float(flat[0]), "dtype": val.dtype, "shape": arr.shape},
                name="const")
        else:
            val.ref = self.state.add_weight(f"{self.name}_const", np.asarray(arr, order="C"))
        return val.ref

    def _symbolic_data(self, val: Val) -> str:
        """Materialize a known tensor holding symbolic dims (``[T, 8]`` used as data, not as a shape)."""
        pieces = [self._dim_scalar(v, val.dtype) for v in val.const.reshape(-1)]
        if val.rank == 0:
            return pieces[0]
        flat = [self.state.builder.add(ops.RESHAPE, [p], {"shape": (1,)}, name="dim") for p in pieces]
        joined = flat[0] if len(flat) == 1 else self.state.builder.add(ops.CONCAT, flat, {"axis": 0}, name="dims")
        return self.state.builder.add(ops.RESHAPE, [joined], {"shape": val.shape}, name="dims")

    def _dim_scalar(self, value, dtype: DType) -> str:
        """A runtime scalar equal to a dim expression e: sum(ones[e]) (the IR has no op reading a
        dim's value; passes fold this to a constant once e is static)."""
        expr = sympy.sympify(value)
        add = self.state.builder.add
        if expr.is_number:
            return add(ops.CONSTANT, (), {"value": float(expr), "dtype": dtype}, name="const")
        sign = 1 if expr.is_nonnegative else -1 if (-expr).is_nonnegative else 0
        if sign == 0:
            raise UnsupportedError(f"{self.where}: cannot use the shape-derived value {expr} as tensor data")
        ones = add(ops.CONSTANT, (), {"value": 1.0, "dtype": dtype, "shape": (as_dim(sign * expr, self.where),)},
                   name="ones")
        total = add(ops.SUM, [ones], {"axes": (0,)}, name="dim_value")
        return total if sign > 0 else add(ops.NEG, [total], name="dim_value")

    def cast(self, val: Val, dtype: DType) -> Val:
        if val.dtype is dtype:
            return val
        folded = self.fold(lambda a: a.astype(dtype.numpy) if a.dtype != object else a, val, dtype=dtype)
        return folded or self.emit(ops.CAST, [val], {"dtype": dtype})

    def reshape(self, val: Val, shape: tuple) -> Val:
        """Reshape to IR dims (folded when the input is known and the shape static)."""
        if tuple(shape) == tuple(val.shape):
            return val
        if all(isinstance(d, int) for d in shape):
            folded = self.fold(lambda a: a.reshape(shape), val)
            if folded is not None:
                return folded
        return self.emit(ops.RESHAPE, [val], {"shape": tuple(shape)})

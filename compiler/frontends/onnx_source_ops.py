"""ONNX converters for tensor sources: Constant, ConstantOfShape, Range, and Trilu masks.

Small results are kept known at import time (foldable); large or symbolic ones become IR
``constant`` / ``arange`` ops or weights.
"""

from __future__ import annotations

import numpy as np
import sympy

from slimgraph.compiler import ops
from slimgraph.compiler.errors import UnsupportedError
from slimgraph.compiler.frontends.onnx_context import (
    FOLD_LIMIT, NodeContext, Val, as_dim, converter, small_static, to_dims,
)
from slimgraph.compiler.types import DType, TensorType


@converter("Trilu")
def convert_trilu(ctx: NodeContext) -> Val:
    """Keep x[..., i, j] where j - i >= k (upper) or j - i <= k (lower); zero elsewhere."""
    x = ctx.input(0)
    k = ctx.known_ints(1, "k")[0] if ctx.input(1) is not None else 0
    upper = bool(ctx.attr("upper", 1))
    folded = ctx.fold(lambda a: np.triu(a, k) if upper else np.tril(a, k), x)
    if folded is not None:
        return folded
    rows = ctx.emit(ops.ARANGE, [], {"length": x.shape[-2]}, hint=f"{ctx.name}_rows")
    cols = ctx.emit(ops.ARANGE, [], {"length": x.shape[-1]}, hint=f"{ctx.name}_cols")
    offset = ctx.emit(ops.SUB, [ctx.reshape(cols, (1, x.shape[-1])), ctx.reshape(rows, (x.shape[-2], 1))])
    keep = ctx.emit(ops.GE if upper else ops.LE, [offset, ctx.const(np.asarray(k, np.int64))])
    return ctx.emit(ops.WHERE, [keep, x, ctx.const(np.zeros((), x.dtype.numpy))])


# ----------------------------------------------------------------------------- sources
@converter("Constant")
def convert_constant(ctx: NodeContext) -> Val:
    """A Constant node: a tensor or value_float(s)/value_int(s) attribute."""
    table = {"value": None, "value_float": np.float32, "value_floats": np.float32,
             "value_int": np.int64, "value_ints": np.int64}
    for key, np_dtype in table.items():
        value = ctx.attr(key)
        if value is not None:
            array = np.asarray(value, np_dtype) if np_dtype is not None else value
            return _constant_val(ctx, array)
    present = [a.name for a in ctx.node.attribute]
    raise UnsupportedError(f"{ctx.where}: Constant with attribute(s) {present} is not supported")


def _constant_val(ctx: NodeContext, array: np.ndarray) -> Val:
    """Small constants stay known (foldable); large ones become weights named after the tensor."""
    if array.size <= FOLD_LIMIT:
        return ctx.const(array)
    ref = ctx.state.add_weight(ctx.node.output[0], array)
    return Val(TensorType(DType.from_numpy(array.dtype), array.shape), ref=ref)


@converter("ConstantOfShape")
def convert_constant_of_shape(ctx: NodeContext) -> Val:
    """A tensor of the given (possibly symbolic) shape filled with `value` (default float32 0)."""
    value = ctx.attr("value")
    value = np.zeros((1,), np.float32) if value is None else value
    shape = to_dims(ctx.known(0, "shape"), ctx.where)
    if small_static(shape):
        return ctx.const(np.full(shape, value.reshape(-1)[0], value.dtype))
    dtype = DType.from_numpy(value.dtype)
    return ctx.emit(ops.CONSTANT, [], {"value": float(value.reshape(-1)[0]), "dtype": dtype, "shape": shape})


@converter("Range")
def convert_range(ctx: NodeContext) -> Val:
    """start + delta * i for i < ceil((limit - start) / delta); the length may be symbolic."""
    start, limit, delta = (ctx.known(i, name).reshape(-1)[0] for i, name in enumerate(("start", "limit", "delta")))
    dtype = ctx.input(0).dtype
    length = as_dim(sympy.ceiling((sympy.sympify(limit) - sympy.sympify(start)) / sympy.sympify(delta)), ctx.where)
    length = max(length, 0) if isinstance(length, int) else length
    if isinstance(length, int) and length <= FOLD_LIMIT:
        return ctx.const(np.arange(length, dtype=np.int64) * delta + start, dtype)
    if not all(isinstance(v, (int, float, np.number)) for v in (start, delta)):
        raise UnsupportedError(f"{ctx.where}: Range start/delta must be static, got {start}, {delta}")
    return ctx.emit(ops.ARANGE, [], {"length": length, "start": float(start), "step": float(delta), "dtype": dtype})

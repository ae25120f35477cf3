"""ONNX op converters for elementwise math, casts and reductions.

Each converter maps one ONNX node onto slimgraph IR ops through a :class:`NodeContext`. Ops whose
inputs are all known at import time (shape arithmetic) are folded instead of emitted. Neural-network
ops (matmul, norms, conv, pooling) live in :mod:`onnx_nn_ops`, layout and shape ops in
:mod:`onnx_shape_ops`, tensor sources in :mod:`onnx_source_ops`.
"""

from __future__ import annotations

import math

import numpy as np
import sympy

from slimgraph.compiler import ops
from slimgraph.compiler.errors import UnsupportedError
from slimgraph.compiler.frontends.onnx_context import NodeContext, Val, converter, symbolic_floordiv
from slimgraph.compiler.frontends.onnx_weights import ir_dtype
from slimgraph.compiler.types import DType


# ----------------------------------------------------------------------------- elementwise
def _fold_div(a, b):
    """ONNX Div: true division on floats, truncation toward zero on integers (dims: symbolic floor)."""
    if a.dtype == object or b.dtype == object:
        return np.frompyfunc(symbolic_floordiv, 2, 1)(a, b)
    if a.dtype.kind == "f":
        return a / b
    quotient = np.abs(a) // np.abs(b)
    return (quotient * np.sign(a) * np.sign(b)).astype(a.dtype)


_BINARY = {
    "Add": (ops.ADD, np.add), "Sub": (ops.SUB, np.subtract), "Mul": (ops.MUL, np.multiply),
    "Div": (ops.DIV, _fold_div), "Equal": (ops.EQ, np.equal), "Less": (ops.LT, np.less),
    "LessOrEqual": (ops.LE, np.less_equal), "Greater": (ops.GT, np.greater),
    "GreaterOrEqual": (ops.GE, np.greater_equal), "And": (ops.LOGICAL_AND, np.logical_and),
    "Or": (ops.LOGICAL_OR, np.logical_or),
}


def _binary_converter(op, fold_fn):
    def convert(ctx: NodeContext) -> Val:
        a, b = ctx.input(0), ctx.input(1)
        result_dtype = DType.bool if op in (ops.EQ, ops.LT, ops.LE, ops.GT, ops.GE) else a.dtype
        return ctx.fold(fold_fn, a, b, dtype=result_dtype) or ctx.emit(op, [a, b])

    return convert


for _op_type, (_op, _fold) in _BINARY.items():
    converter(_op_type)(_binary_converter(_op, _fold))


@converter("Pow")
def convert_pow(ctx: NodeContext) -> Val:
    """x ** y; ONNX lets the exponent have another dtype, the IR casts it to the base's."""
    base, exponent = ctx.input(0), ctx.input(1)
    exponent = ctx.cast(exponent, base.dtype)
    return ctx.fold(np.power, base, exponent) or ctx.emit(ops.POW, [base, exponent])


@converter("Mod")
def convert_mod(ctx: NodeContext) -> Val:
    """Mod with the divisor's sign (fmod=0) is numpy's mod; C-style fmod=1 only on integers, where
    both agree for the non-negative operands shape code uses, or when folded."""
    a, b = ctx.input(0), ctx.input(1)
    fmod = ctx.attr("fmod", 0)
    folded = ctx.fold(np.fmod if fmod else np.mod, a, b)
    if folded is not None:
        return folded
    if fmod and a.dtype.is_float:
        raise UnsupportedError(f"{ctx.where}: Mod with fmod=1 on floats is not supported")
    return ctx.emit(ops.MOD, [a, b])


def _variadic_converter(op, fold_fn):
    def convert(ctx: NodeContext) -> Val:
        result = ctx.input(0)
        for other in ctx.inputs()[1:]:
            result = ctx.fold(fold_fn, result, other) or ctx.emit(op, [result, other])
        return result

    return convert


def _symbolic_min(a, b):
    """min of known values; an undecidable min(c, T) of a static bound c and a symbolic dim T is
    taken as T: dims are assumed to stay within the model's static limits (e.g. max positions)."""
    result = sympy.Min(sympy.sympify(a), sympy.sympify(b))
    if isinstance(result, sympy.Min):
        symbolic = [v for v in result.args if not v.is_number]
        return symbolic[0] if len(symbolic) == 1 else result
    return result


def _fold_min(a, b):
    if a.dtype == object or b.dtype == object:
        return np.frompyfunc(_symbolic_min, 2, 1)(a, b)
    return np.minimum(a, b)


def _fold_max(a, b):
    if a.dtype == object or b.dtype == object:
        return np.frompyfunc(lambda x, y: sympy.Max(sympy.sympify(x), sympy.sympify(y)), 2, 1)(a, b)
    return np.maximum(a, b)


converter("Max")(_variadic_converter(ops.MAXIMUM, _fold_max))
converter("Min")(_variadic_converter(ops.MINIMUM, _fold_min))
converter("Sum")(_variadic_converter(ops.ADD, np.add))

_UNARY = {
    "Sqrt": (ops.SQRT, np.sqrt), "Reciprocal": (ops.RECIPROCAL, np.reciprocal), "Erf": (ops.ERF, None),
    "Tanh": (ops.TANH, np.tanh), "Exp": (ops.EXP, np.exp), "Log": (ops.LOG, np.log),
    "Neg": (ops.NEG, np.negative), "Abs": (ops.ABS, np.abs), "Sigmoid": (ops.SIGMOID, None),
    "Relu": (ops.RELU, None), "Sin": (ops.SIN, np.sin), "Cos": (ops.COS, np.cos),
    "Floor": (ops.FLOOR, np.floor), "Not": (ops.LOGICAL_NOT, np.logical_not),
}


def _unary_converter(op, fold_fn):
    def convert(ctx: NodeContext) -> Val:
        x = ctx.input(0)
        folded = ctx.fold(fold_fn, x) if fold_fn is not None else None
        return folded or ctx.emit(op, [x])

    return convert


for _op_type, (_op, _fold) in _UNARY.items():
    converter(_op_type)(_unary_converter(_op, _fold))


@converter("Identity", "Dropout")
def convert_identity(ctx: NodeContext) -> Val:
    """Identity, and Dropout at inference (its optional mask output is not provided)."""
    return ctx.input(0)


@converter("Cast")
def convert_cast(ctx: NodeContext) -> Val:
    return ctx.cast(ctx.input(0), ir_dtype(ctx.attr("to"), ctx.where))


@converter("CastLike")
def convert_cast_like(ctx: NodeContext) -> Val:
    return ctx.cast(ctx.input(0), ctx.input(1).dtype)


@converter("Clip")
def convert_clip(ctx: NodeContext) -> Val:
    """clip(x, min, max); the bounds come from inputs 1/2 (opset 11+) and must be known."""
    low = float(ctx.known(1, "min").reshape(-1)[0]) if ctx.input(1) is not None else -math.inf
    high = float(ctx.known(2, "max").reshape(-1)[0]) if ctx.input(2) is not None else math.inf
    return ctx.emit(ops.CLIP, [ctx.input(0)], {"min": low, "max": high})


@converter("Where")
def convert_where(ctx: NodeContext) -> Val:
    cond, a, b = ctx.input(0), ctx.input(1), ctx.input(2)
    return ctx.fold(np.where, cond, a, b, dtype=a.dtype) or ctx.emit(ops.WHERE, [cond, a, b])


# ----------------------------------------------------------------------------- reductions
_REDUCTIONS = {
    "ReduceMean": (ops.MEAN, np.mean), "ReduceSum": (ops.SUM, np.sum), "ReduceMax": (ops.MAX, np.max),
    "ReduceMin": (ops.MIN, np.min), "ReduceProd": (ops.PROD, np.prod),
}


def _reduce_converter(op, fold_fn):
    def convert(ctx: NodeContext) -> Val:
        """Reduce over `axes` (attribute before opset 18, input 1 after); none means all axes."""
        x = ctx.input(0)
        axes = ctx.axes(1)
        if not axes and ctx.attr("noop_with_empty_axes", 0):
            return x
        axes = tuple(a % x.rank for a in axes) if axes else tuple(range(x.rank))
        keep = bool(ctx.attr("keepdims", 1))
        folded = ctx.fold(lambda a: fold_fn(a, axis=axes, keepdims=keep), x)
        return folded or ctx.emit(op, [x], {"axes": axes, "keepdims": keep})

    return convert


for _op_type, (_op, _fold) in _REDUCTIONS.items():
    converter(_op_type)(_reduce_converter(_op, _fold))


@converter("ArgMax")
def convert_argmax(ctx: NodeContext) -> Val:
    if ctx.attr("select_last_index", 0):
        raise UnsupportedError(f"{ctx.where}: ArgMax with select_last_index=1 is not supported")
    return ctx.emit(ops.ARGMAX, [ctx.input(0)], {"axis": ctx.attr("axis", 0), "keepdims": bool(ctx.attr("keepdims", 1))})


@converter("CumSum")
def convert_cumsum(ctx: NodeContext) -> Val:
    if ctx.attr("exclusive", 0) or ctx.attr("reverse", 0):
        raise UnsupportedError(f"{ctx.where}: CumSum with exclusive/reverse is not supported")
    axis = ctx.known_ints(1, "axis")[0]
    return ctx.emit(ops.CUMSUM, [ctx.input(0)], {"axis": axis})

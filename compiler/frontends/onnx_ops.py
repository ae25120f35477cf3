"""ONNX op converters for math: elementwise ops, contractions, normalizations, reductions and CNN ops.

Each converter maps one ONNX node onto slimgraph IR ops through a :class:`NodeContext`. Ops whose
inputs are all known at import time (shape arithmetic) are folded instead of emitted. Layout and
shape ops live in :mod:`onnx_shape_ops`.
"""

from __future__ import annotations

import math

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.errors import UnsupportedError
from slimgraph.compiler.frontends.onnx_context import NodeContext, Val, converter, symbolic_floordiv
from slimgraph.compiler.frontends.onnx_weights import ir_dtype
from slimgraph.compiler.types import DType


def scalar(ctx: NodeContext, value: float, dtype: DType) -> Val:
    """A known scalar of the given dtype (materialized as a constant op when used)."""
    return ctx.const(np.asarray(value, dtype.numpy), dtype)


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


converter("Max")(_variadic_converter(ops.MAXIMUM, np.maximum))
converter("Min")(_variadic_converter(ops.MINIMUM, np.minimum))
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


# ----------------------------------------------------------------------------- activations / norms
@converter("Gelu")
def convert_gelu(ctx: NodeContext) -> Val:
    """gelu(x) = x * Phi(x) (ONNX opset 20 and com.microsoft Gelu); approximate="tanh" if asked."""
    return ctx.emit(ops.GELU, [ctx.input(0)], {"approximate": ctx.attr("approximate", "none")})


@converter("FastGelu")
def convert_fast_gelu(ctx: NodeContext) -> Val:
    """com.microsoft FastGelu: tanh-approximated gelu of (x + optional bias)."""
    x = ctx.input(0)
    if ctx.input(1) is not None:
        x = ctx.emit(ops.ADD, [x, ctx.input(1)])
    return ctx.emit(ops.GELU, [x], {"approximate": "tanh"})


@converter("Softmax", "LogSoftmax")
def convert_softmax(ctx: NodeContext) -> Val:
    """softmax over one axis (opset 13 semantics, default the last axis)."""
    return ctx.emit(ops.SOFTMAX, [ctx.input(0)], {"axis": ctx.attr("axis", -1), "log": ctx.op_type == "LogSoftmax"})


@converter("LayerNormalization")
def convert_layer_norm(ctx: NodeContext) -> Val:
    """(x - mean) / sqrt(var + eps) * scale + bias over the axes from `axis` to the end."""
    x = ctx.input(0)
    num_axes = x.rank - ctx.attr("axis", -1) % x.rank
    params = [v for v in (ctx.input(1), ctx.input(2)) if v is not None]
    return ctx.emit(ops.LAYER_NORM, [x] + params, {"num_axes": num_axes, "eps": ctx.attr("epsilon", 1e-5)})


@converter("SimplifiedLayerNormalization", "RMSNormalization")
def convert_rms_norm(ctx: NodeContext) -> Val:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis (LLaMA's RMSNorm)."""
    x = ctx.input(0)
    if ctx.attr("axis", -1) % x.rank != x.rank - 1:
        raise UnsupportedError(f"{ctx.where}: RMS normalization over axis {ctx.attr('axis')} (only the last axis)")
    params = [ctx.input(1)] if ctx.input(1) is not None else []
    return ctx.emit(ops.RMS_NORM, [x] + params, {"eps": ctx.attr("epsilon", 1e-5)})


# ----------------------------------------------------------------------------- contractions
@converter("MatMul")
def convert_matmul(ctx: NodeContext) -> Val:
    return ctx.emit(ops.MATMUL, [ctx.input(0), ctx.input(1)])


def transpose2d(ctx: NodeContext, val: Val) -> Val:
    return ctx.emit(ops.TRANSPOSE, [val], {"perm": (1, 0)}, hint=f"{ctx.name}_t")


@converter("Gemm")
def convert_gemm(ctx: NodeContext) -> Val:
    """alpha * op(A) @ op(B) + beta * C; transB=1 is a linear layer: matmul(x, transpose(W))."""
    a, b, c = ctx.input(0), ctx.input(1), ctx.input(2)
    a = transpose2d(ctx, a) if ctx.attr("transA", 0) else a
    b = transpose2d(ctx, b) if ctx.attr("transB", 0) else b
    out = ctx.emit(ops.MATMUL, [a, b])
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    if alpha != 1.0:
        out = ctx.emit(ops.MUL, [out, scalar(ctx, alpha, out.dtype)])
    if c is not None and beta != 0.0:
        c = c if beta == 1.0 else ctx.emit(ops.MUL, [c, scalar(ctx, beta, c.dtype)])
        out = ctx.emit(ops.ADD, [out, c])
    return out


def _same_pads(ctx: NodeContext, spatial, kernel, strides, dilations) -> list[int]:
    """auto_pad SAME_*: pad so that out = ceil(in / stride); the odd pixel goes at the end (UPPER)."""
    if not all(isinstance(d, int) for d in spatial):
        raise UnsupportedError(f"{ctx.where}: auto_pad SAME needs static spatial dims, got {list(spatial)}")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
        small = total // 2
        upper = ctx.attr("auto_pad") == "SAME_UPPER"
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    return begins + ends


def window_pads(ctx: NodeContext, spatial, kernel, strides, dilations) -> tuple:
    """ONNX pads [h_begin, w_begin, h_end, w_end] == IR padding (top, left, bottom, right)."""
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(_same_pads(ctx, spatial, kernel, strides, dilations))
    if auto == "VALID":
        return (0,) * (2 * len(kernel))
    return tuple(ctx.attr("pads", [0] * (2 * len(kernel))))


def _require_2d(ctx: NodeContext, x: Val) -> None:
    if x.rank != 4:
        raise UnsupportedError(f"{ctx.where}: only 2-D (NCHW) windows are supported, input is {x.type}")


@converter("Conv")
def convert_conv(ctx: NodeContext) -> Val:
    x, w, bias = ctx.input(0), ctx.input(1), ctx.input(2)
    _require_2d(ctx, x)
    kernel = w.shape[2:]
    strides, dilations = tuple(ctx.attr("strides", [1, 1])), tuple(ctx.attr("dilations", [1, 1]))
    attrs = {"strides": strides, "dilation": dilations, "groups": ctx.attr("group", 1),
             "padding": window_pads(ctx, x.shape[2:], kernel, strides, dilations)}
    return ctx.emit(ops.CONV2D, [x, w] + ([bias] if bias is not None else []), attrs)


def _pool_attrs(ctx: NodeContext, x: Val, kernel) -> dict:
    _require_2d(ctx, x)
    if any(d != 1 for d in ctx.attr("dilations", [1, 1])):
        raise UnsupportedError(f"{ctx.where}: dilated pooling is not supported")
    strides = tuple(ctx.attr("strides", [1, 1]))
    pads = window_pads(ctx, x.shape[2:], kernel, strides, (1, 1))
    if ctx.attr("ceil_mode", 0):
        for size, k, s, lo, hi in zip(x.shape[2:], kernel, strides, pads[:2], pads[2:]):
            if not isinstance(size, int) or (size + lo + hi - k) % s:
                raise UnsupportedError(f"{ctx.where}: ceil_mode=1 changes the output size here (not supported)")
    return {"kernel": tuple(kernel), "strides": strides, "padding": pads}


@converter("MaxPool")
def convert_max_pool(ctx: NodeContext) -> Val:
    x = ctx.input(0)
    return ctx.emit(ops.MAX_POOL2D, [x], _pool_attrs(ctx, x, ctx.attr("kernel_shape")))


@converter("AveragePool")
def convert_avg_pool(ctx: NodeContext) -> Val:
    """IR avg_pool2d averages padding zeros too; count_include_pad=0 is only exact without padding."""
    x = ctx.input(0)
    attrs = _pool_attrs(ctx, x, ctx.attr("kernel_shape"))
    if any(attrs["padding"]) and not ctx.attr("count_include_pad", 0):
        raise UnsupportedError(f"{ctx.where}: padded AveragePool with count_include_pad=0 is not supported")
    return ctx.emit(ops.AVG_POOL2D, [x], attrs)


@converter("GlobalAveragePool", "GlobalMaxPool")
def convert_global_pool(ctx: NodeContext) -> Val:
    """Mean (or max) over all spatial axes, keeping them as size-1 dims."""
    x = ctx.input(0)
    op = ops.MEAN if ctx.op_type == "GlobalAveragePool" else ops.MAX
    return ctx.emit(op, [x], {"axes": tuple(range(2, x.rank)), "keepdims": True})


@converter("BatchNormalization")
def convert_batch_norm(ctx: NodeContext) -> Val:
    """Inference batch norm: (x - mean) / sqrt(var + eps) * scale + bias over the channel axis."""
    if ctx.attr("training_mode", 0):
        raise UnsupportedError(f"{ctx.where}: BatchNormalization in training mode is not supported")
    x, scale, bias, mean, var = ctx.inputs()[:5]
    return ctx.emit(ops.BATCH_NORM, [x, mean, var, scale, bias], {"eps": ctx.attr("epsilon", 1e-5)})


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

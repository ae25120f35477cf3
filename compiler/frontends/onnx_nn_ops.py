"""ONNX op converters for neural-network ops: activations, normalizations, MatMul/Gemm, Conv,
pooling and inference BatchNormalization."""

from __future__ import annotations

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.errors import UnsupportedError
from slimgraph.compiler.frontends.onnx_context import NodeContext, Val, converter
from slimgraph.compiler.types import DType


def scalar(ctx: NodeContext, value: float, dtype: DType) -> Val:
    """A known scalar of the given dtype (materialized as a constant op when used)."""
    return ctx.const(np.asarray(value, dtype.numpy), dtype)


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

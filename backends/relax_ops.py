"""How each slimgraph op becomes Relax ops (registered into relax_lowering.LOWERINGS).

Most ops map one-to-one. A few need care:
  * cumsum over bool is computed in int32 and cast back (TVM's LLVM codegen rejects bool adds);
  * layer_norm / rms_norm without affine parameters get constant ones / zeros;
  * conv2d's bias is added as a broadcast [1, O, 1, 1] tensor; batch_norm is expanded to x*s + t.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from slimgraph.backends.relax_lowering import TVM_DTYPES, const, lowering
from slimgraph.compiler import ops
from slimgraph.compiler.types import DType

R = relax.op


def _unary(fn):
    return lambda ctx, args: fn(args[0])


_UNARY = {
    ops.NEG: R.negative, ops.ABS: R.abs, ops.EXP: R.exp, ops.LOG: R.log, ops.SQRT: R.sqrt, ops.RSQRT: R.rsqrt,
    ops.TANH: R.tanh, ops.SIGMOID: R.sigmoid, ops.RELU: R.nn.relu, ops.SILU: R.nn.silu, ops.ERF: R.erf,
    ops.SIN: R.sin, ops.COS: R.cos, ops.FLOOR: R.floor, ops.LOGICAL_NOT: R.logical_not,
}
for _op, _fn in _UNARY.items():
    lowering(_op)(_unary(_fn))

_BINARY = {
    ops.ADD: R.add, ops.SUB: R.subtract, ops.MUL: R.multiply, ops.FLOOR_DIV: R.floor_divide, ops.MOD: R.floor_mod,
    ops.POW: R.power, ops.MAXIMUM: R.maximum, ops.MINIMUM: R.minimum, ops.EQ: R.equal, ops.NE: R.not_equal,
    ops.LT: R.less, ops.LE: R.less_equal, ops.GT: R.greater, ops.GE: R.greater_equal,
    ops.LOGICAL_AND: R.logical_and, ops.LOGICAL_OR: R.logical_or,
}
for _op, _fn in _BINARY.items():
    lowering(_op)(lambda ctx, args, _fn=_fn: _fn(args[0], args[1]))


@lowering(ops.MATMUL)
def _matmul(ctx, args):
    out = ctx.node.attr("out_dtype")
    return R.matmul(args[0], args[1], out_dtype=TVM_DTYPES[out] if out is not None else None)


@lowering(ops.DIV)
def _div(ctx, args):
    if ctx.in_types[0].dtype.is_float:
        return R.divide(args[0], args[1])
    # integer division truncates toward zero (C semantics, like torch's trunc mode)
    return R.astype(R.trunc(R.divide(R.astype(args[0], "float64"), R.astype(args[1], "float64"))),
                    TVM_DTYPES[ctx.node.type.dtype])


@lowering(ops.RECIPROCAL)
def _reciprocal(ctx, args):
    return R.divide(const(1.0, ctx.node.type.dtype), args[0])


@lowering(ops.GELU)
def _gelu(ctx, args):
    return R.nn.gelu_tanh(args[0]) if ctx.node.attr("approximate") == "tanh" else R.nn.gelu(args[0])


@lowering(ops.CLIP)
def _clip(ctx, args):
    dtype = ctx.node.type.dtype
    lo, hi = ctx.node.attr("min"), ctx.node.attr("max")
    out = args[0]
    if np.isfinite(lo):
        out = R.maximum(out, const(lo, dtype))
    if np.isfinite(hi):
        out = R.minimum(out, const(hi, dtype))
    return out


@lowering(ops.CAST)
def _cast(ctx, args):
    return R.astype(args[0], TVM_DTYPES[ctx.node.attr("dtype")])


@lowering(ops.WHERE)
def _where(ctx, args):
    return R.where(args[0], args[1], args[2])


# ----------------------------------------------------------------------------- reductions
def _axes(ctx):
    axes = ctx.node.attr("axes")
    return list(axes) if axes else None


_REDUCE = {ops.SUM: R.sum, ops.MEAN: R.mean, ops.MAX: R.max, ops.MIN: R.min, ops.PROD: R.prod}
for _op, _fn in _REDUCE.items():
    lowering(_op)(lambda ctx, args, _fn=_fn: _fn(args[0], _axes(ctx), ctx.node.attr("keepdims")))


@lowering(ops.ANY)
def _any(ctx, args):
    as_int = R.astype(args[0], "int32")
    return R.astype(R.max(as_int, _axes(ctx), ctx.node.attr("keepdims")), "bool")


@lowering(ops.ALL)
def _all(ctx, args):
    as_int = R.astype(args[0], "int32")
    return R.astype(R.min(as_int, _axes(ctx), ctx.node.attr("keepdims")), "bool")


@lowering(ops.ARGMAX)
def _argmax(ctx, args):
    return R.astype(R.argmax(args[0], ctx.node.attr("axis"), ctx.node.attr("keepdims")), "int64")


@lowering(ops.CUMSUM)
def _cumsum(ctx, args):
    dtype = ctx.in_types[0].dtype
    if dtype is DType.bool:
        summed = R.cumsum(R.astype(args[0], "int32"), axis=ctx.node.attr("axis"), dtype="int32")
        return R.astype(summed, "bool")
    return R.cumsum(args[0], axis=ctx.node.attr("axis"), dtype=TVM_DTYPES[dtype])


@lowering(ops.SOFTMAX)
def _softmax(ctx, args):
    fn = R.nn.log_softmax if ctx.node.attr("log") else R.nn.softmax
    return fn(args[0], axis=ctx.node.attr("axis"))


def _norm_param(ctx, args, index, shape, fill):
    if len(args) > index:
        return args[index]
    return ctx.emit(filled(ctx, shape, fill, ctx.node.type.dtype))


@lowering(ops.LAYER_NORM)
def _layer_norm(ctx, args):
    x = ctx.in_types[0]
    k = ctx.node.attr("num_axes")
    shape = tuple(x.shape[x.rank - k:])
    axes = list(range(x.rank - k, x.rank))
    gamma = _norm_param(ctx, args, 1, shape, 1.0)
    beta = _norm_param(ctx, args, 2, shape, 0.0)
    return R.nn.layer_norm(args[0], gamma, beta, axes, epsilon=ctx.node.attr("eps"))


@lowering(ops.RMS_NORM)
def _rms_norm(ctx, args):
    x = ctx.in_types[0]
    weight = _norm_param(ctx, args, 1, (x.shape[-1],), 1.0)
    return R.nn.rms_norm(args[0], weight, [-1], epsilon=ctx.node.attr("eps"))


# ----------------------------------------------------------------------------- layout
@lowering(ops.RESHAPE)
def _reshape(ctx, args):
    return R.reshape(args[0], ctx.out_shape())


@lowering(ops.TRANSPOSE)
def _transpose(ctx, args):
    return R.permute_dims(args[0], list(ctx.node.attr("perm")))


@lowering(ops.BROADCAST_TO)
def _broadcast(ctx, args):
    return R.broadcast_to(args[0], ctx.out_shape())


@lowering(ops.CONCAT)
def _concat(ctx, args):
    return R.concat(args, axis=ctx.node.attr("axis"))


@lowering(ops.SLICE)
def _slice(ctx, args):
    a = ctx.node.attrs
    axis = a["axis"] % ctx.in_types[0].rank
    return R.strided_slice(args[0], [axis], [ctx.prim(a["start"])], [ctx.prim(a["end"])], [a["step"]],
                           assume_inbound=True)


@lowering(ops.TAKE)
def _take(ctx, args):
    return R.take(args[0], args[1], axis=ctx.node.attr("axis"), mode="clip")


@lowering(ops.GATHER_ELEMENTS)
def _gather_elements(ctx, args):
    return R.gather_elements(args[0], args[1], axis=ctx.node.attr("axis"))


@lowering(ops.PAD)
def _pad(ctx, args):
    return R.nn.pad(args[0], list(ctx.node.attr("pads")), pad_value=ctx.node.attr("value"))


# ----------------------------------------------------------------------------- sources
@lowering(ops.CONSTANT)
def _constant(ctx, args):
    """Built as zeros + scalar: fused functions, which become single TIR kernels, may not hold
    tensor constants, and only scalars folded into an arithmetic op become immediates."""
    t = ctx.node.type
    return filled(ctx, t.shape, ctx.node.attr("value"), t.dtype)


def filled(ctx, shape, value, dtype: DType) -> relax.Expr:
    """A tensor of one value, built as zeros + scalar so the scalar folds into the kernel
    (bool tensors as a comparison of int32 zeros: LLVM has no arithmetic on i1)."""
    dims = [ctx.prim(d) for d in shape]
    if dtype is DType.bool:
        zeros = ctx.emit(R.zeros(dims, "int32"))
        compare = R.equal if value else R.not_equal
        return compare(zeros, const(0, DType.i32))
    zeros = ctx.emit(R.zeros(dims, TVM_DTYPES[dtype]))
    return R.add(zeros, const(value, dtype))


@lowering(ops.ARANGE)
def _arange(ctx, args):
    a = ctx.node.attrs
    dtype = TVM_DTYPES[a["dtype"]]
    start, step = a["start"], a["step"]
    if a["dtype"].is_float:
        end = ctx.prim(a["length"]).astype("float64") * step + start
        return R.arange(start, end, step, dtype)
    end = ctx.prim(a["length"]) * int(step) + int(start)
    return R.arange(int(start), end, int(step), dtype)


# ----------------------------------------------------------------------------- nn
@lowering(ops.CONV2D)
def _conv2d(ctx, args):
    a = ctx.node.attrs
    out = R.nn.conv2d(args[0], args[1], strides=list(a["strides"]), padding=list(a["padding"]),
                      dilation=list(a["dilation"]), groups=a["groups"])
    if len(args) > 2:
        out = R.add(ctx.emit(out), ctx.emit(R.reshape(args[2], [1, -1, 1, 1])))
    return out


def _pool(fn, **extra):
    def lower(ctx, args):
        a = ctx.node.attrs
        return fn(args[0], pool_size=list(a["kernel"]), strides=list(a["strides"]), padding=list(a["padding"]),
                  **extra)

    return lower


lowering(ops.MAX_POOL2D)(_pool(R.nn.max_pool2d))
lowering(ops.AVG_POOL2D)(_pool(R.nn.avg_pool2d, count_include_pad=True))


@lowering(ops.BATCH_NORM)
def _batch_norm(ctx, args):
    x, mean, var, w, b = args
    rank = ctx.in_types[0].rank
    shape = [1, -1] + [1] * (rank - 2)
    eps = const(ctx.node.attr("eps"), ctx.node.type.dtype)
    scale = ctx.emit(R.multiply(w, R.rsqrt(R.add(var, eps))))
    shift = ctx.emit(R.subtract(b, R.multiply(mean, scale)))
    return R.add(R.multiply(x, ctx.emit(R.reshape(scale, shape))), ctx.emit(R.reshape(shift, shape)))


FLOAT_MAGIC_BITS = 0x4B000000  # the float32 2^23: its mantissa's low bits hold a small integer exactly
FLOAT_MAGIC = float(1 << 23)


def code_to_float(code, *, through_bits: bool = False):
    """A small unsigned integer code (under 2^23) as float32. ``through_bits`` writes the code into the
    mantissa of 2^23 and subtracts 2^23 (``(2^23 + q) - 2^23 = q`` exactly): a bitwise or and a float
    subtraction, where CUDA's throughput table lists the integer-to-float conversion at an eighth of
    the float multiply-add rate on Hopper."""
    from tvm import tirx

    if not through_bits:
        return code.astype("float32")
    biased = tirx.bitwise_or(code, tirx.const(FLOAT_MAGIC_BITS, "uint32"))
    return tirx.reinterpret("float32", biased) - tirx.const(FLOAT_MAGIC, "float32")


def dequantize_compute(words, scales, zeros, *, bits: int, group: int, out_shape, out_dtype: str,
                       codes_through_bits: bool = False):
    """TE tensor ``(q - z) * s`` of packed words ``[K / per_word, ...]``, scales and optional zero
    points ``[K / group, ...]``, as ``out_dtype`` (``zeros`` empty: symmetric codes)."""
    from tvm import te, tirx

    from slimgraph.backends.schedules._quantized_gemv import zero_point

    per_word = 32 // bits

    def element(k, *rest):
        shift = tirx.Cast("uint32", tirx.floormod(k, per_word) * bits)
        word = words[(tirx.floordiv(k, per_word),) + rest]
        code = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const((1 << bits) - 1, "uint32"))
        g = (tirx.floordiv(k, group),) + rest
        zero = zero_point(zeros, g, bits)
        scale = scales[g].astype("float32")
        # code * scale - zero * scale: one fused multiply-add per weight, zero * scale is the
        # same for a whole group (hoisted out of the unrolled k steps of a product)
        return (code_to_float(code, through_bits=codes_through_bits) * scale - zero * scale).astype(out_dtype)

    return te.compute(out_shape, element, name="dequantize")


def call_dequantize(builder, args, *, bits: int, group: int, out_shape, out_dtype: str):
    """``builder.call_te`` of :func:`dequantize_compute` over ``args`` (words, scales, [zeros]): a
    PrimFunc marked with its bits and group size, which FuseTIR inlines into the consuming kernel."""
    from slimgraph.backends.schedules._quantized_gemv import DEQUANTIZE_ATTR

    def compute(words, scales, *zeros):
        return dequantize_compute(words, scales, zeros, bits=bits, group=group, out_shape=out_shape,
                                  out_dtype=out_dtype)

    return builder.call_te(compute, *args, primfunc_name_hint="dequantize",
                           primfunc_attrs={DEQUANTIZE_ATTR: {"bits": bits, "group_size": group}})


@lowering(ops.DEQUANTIZE)
def _dequantize(ctx, args):
    """A TE compute (one injective block) that FuseTIR inlines into the consuming kernel."""
    return call_dequantize(ctx.builder, args, bits=ctx.node.attr("bits"), group=ctx.node.attr("group_size"),
                           out_shape=ctx.out_shape(), out_dtype=TVM_DTYPES[ctx.node.attr("dtype")])


@lowering(ops.DYNAMIC_QUANTIZE)
def _dynamic_quantize(ctx, args):
    """Two TE blocks (the largest magnitude per block, then the rounded values); the PrimFunc is
    marked so a one-row product reading it can take the activation codes instead (``_integer_gemv``)."""
    from tvm import te, tirx

    from slimgraph.backends.schedules._integer_gemv import CODE_LIMIT, DYNAMIC_QUANTIZE_ATTR, activation_code

    bits, block = ctx.node.attr("bits"), ctx.node.attr("block")   # bits: 8, the only width the op takes

    def compute(x):
        *lead, length = x.shape
        i = te.reduce_axis((0, block), "i")
        peak = te.compute(tuple(lead) + (length // block,), lambda *idx: te.max(
            tirx.abs(x[idx[:-1] + (idx[-1] * block + i,)].astype("float32")), axis=i), name="block_max")

        def element(*idx):
            block_peak = peak[idx[:-1] + (tirx.floordiv(idx[-1], block),)]
            return (activation_code(x[idx].astype("float32"), block_peak) * (block_peak / CODE_LIMIT)).astype(x.dtype)

        return te.compute(x.shape, element, name="dynamic_quantize")

    return ctx.builder.call_te(compute, *args, primfunc_name_hint="dynamic_quantize",
                               primfunc_attrs={DYNAMIC_QUANTIZE_ATTR: {"bits": bits, "block": block}})

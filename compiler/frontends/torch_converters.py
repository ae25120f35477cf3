"""ATen -> slimgraph converters for elementwise math, casts, tensor creation and reductions.

Type promotion follows torch: arithmetic is computed in the output dtype torch recorded (so
``int_tensor / 2`` casts to f32 first); comparisons are computed in ``torch.result_type`` of their
operands and yield bool. Python scalars become ``constant`` nodes of the computation dtype.
"""

from __future__ import annotations

import torch

from slimgraph.compiler import ops
from slimgraph.compiler.frontends.torch_context import aten, converts, meta_value, torch_dtype
from slimgraph.compiler.types import DType


def _promoted(*args) -> DType:
    """torch.result_type over tensors and Python scalars (SymInts count as ints)."""
    vals = [meta_value(a) for a in args]
    vals = [1 if isinstance(v, torch.SymInt) else (1.0 if isinstance(v, torch.SymFloat) else v) for v in vals]
    dtype = vals[0] if len(vals) == 1 else torch.result_type(vals[0], vals[1])
    return torch_dtype(dtype.dtype if isinstance(dtype, torch.Tensor) else dtype)


# ----------------------------------------------------------------------------- binary
def _binary(op, *, compare=False, lhs="self", rhs="other"):
    def convert(ctx, a):
        dtype = _promoted(a[lhs], a[rhs]) if compare else ctx.out_type().dtype
        return ctx.add(op, [ctx.operand(a[lhs], dtype), ctx.operand(a[rhs], dtype)])
    return convert


def _scaled_other(ctx, a, dtype):
    """``alpha * other`` for add/sub (alpha is 1 almost always)."""
    other = ctx.operand(a["other"], dtype)
    alpha = a.get("alpha", 1)
    return other if alpha in (None, 1) else ctx.add(ops.MUL, [other, ctx.constant(alpha, dtype)])


@converts(aten.add.Tensor, aten.add.Scalar)
def _add(ctx, a):
    dtype = ctx.out_type().dtype
    return ctx.add(ops.ADD, [ctx.operand(a["self"], dtype), _scaled_other(ctx, a, dtype)])


@converts(aten.sub.Tensor, aten.sub.Scalar)
def _sub(ctx, a):
    dtype = ctx.out_type().dtype
    return ctx.add(ops.SUB, [ctx.operand(a["self"], dtype), _scaled_other(ctx, a, dtype)])


@converts(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(ctx, a):
    """rsub(self, other, alpha) = other - alpha * self."""
    dtype = ctx.out_type().dtype
    swapped = {"self": a["other"], "other": a["self"], "alpha": a.get("alpha", 1)}
    return ctx.add(ops.SUB, [ctx.operand(swapped["self"], dtype), _scaled_other(ctx, swapped, dtype)])


@converts(aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div_mode(ctx, a):
    """Division with rounding: 'floor' -> floor_div; 'trunc' -> div (truncating for ints)."""
    dtype = ctx.out_type().dtype
    x, y = ctx.operand(a["self"], dtype), ctx.operand(a["other"], dtype)
    mode = a["rounding_mode"]
    if mode == "floor":
        return ctx.add(ops.FLOOR_DIV, [x, y])
    quotient = ctx.add(ops.DIV, [x, y])
    if mode is None or not dtype.is_float:
        return quotient
    sign = ctx.add(ops.LT, [quotient, ctx.constant(0, dtype)])
    return ctx.add(ops.WHERE, [sign, ctx.add(ops.NEG, [ctx.add(ops.FLOOR, [ctx.add(ops.NEG, [quotient])])]),
                               ctx.add(ops.FLOOR, [quotient])])


_BINARY = {
    ops.MUL: (aten.mul.Tensor, aten.mul.Scalar),
    ops.DIV: (aten.div.Tensor, aten.div.Scalar),
    ops.FLOOR_DIV: (aten.floor_divide.default, aten.floor_divide.Scalar),
    ops.MOD: (aten.remainder.Tensor, aten.remainder.Scalar),
    ops.POW: (aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar),
    ops.MAXIMUM: (aten.maximum.default,),
    ops.MINIMUM: (aten.minimum.default,),
}
_COMPARE = {
    ops.EQ: (aten.eq.Tensor, aten.eq.Scalar), ops.NE: (aten.ne.Tensor, aten.ne.Scalar),
    ops.LT: (aten.lt.Tensor, aten.lt.Scalar), ops.LE: (aten.le.Tensor, aten.le.Scalar),
    ops.GT: (aten.gt.Tensor, aten.gt.Scalar), ops.GE: (aten.ge.Tensor, aten.ge.Scalar),
}
for _op, _targets in _BINARY.items():
    converts(*_targets)(_binary(_op, rhs="exponent" if _op is ops.POW else "other"))
for _op, _targets in _COMPARE.items():
    converts(*_targets)(_binary(_op, compare=True))
converts(aten.pow.Scalar)(_binary(ops.POW, rhs="exponent"))


def _logical(op):
    """and/or: on bools directly; on numbers, torch's logical_* compares against zero."""
    def convert(ctx, a):
        if ctx.out_type().dtype is not DType.bool:
            ctx.unsupported("bitwise and/or on integers")
        return ctx.add(op, [_truth(ctx, a["self"]), _truth(ctx, a["other"])])
    return convert


def _truth(ctx, arg):
    ref = ctx.operand(arg, DType.bool) if not isinstance(arg, torch.fx.Node) else ctx.tensor(arg)
    t = ctx.type(ref)
    return ref if t.dtype is DType.bool else ctx.add(ops.NE, [ref, ctx.constant(0, t.dtype)])


converts(aten.logical_and.default, aten.bitwise_and.Tensor, aten.__and__.Tensor)(_logical(ops.LOGICAL_AND))
converts(aten.logical_or.default, aten.bitwise_or.Tensor, aten.__or__.Tensor)(_logical(ops.LOGICAL_OR))


@converts(aten.logical_not.default, aten.bitwise_not.default)
def _not(ctx, a):
    if ctx.out_type().dtype is not DType.bool:
        ctx.unsupported("bitwise not on integers")
    return ctx.add(ops.LOGICAL_NOT, [_truth(ctx, a["self"])])


@converts(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(ctx, a):
    dtype = ctx.out_type().dtype
    cond = _truth(ctx, a["condition"])
    return ctx.add(ops.WHERE, [cond, ctx.operand(a["self"], dtype), ctx.operand(a["other"], dtype)])


@converts(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(ctx, a):
    """masked_fill(x, mask, v) = where(mask, v, x)."""
    dtype = ctx.out_type().dtype
    return ctx.add(ops.WHERE, [_truth(ctx, a["mask"]), ctx.operand(a["value"], dtype), ctx.operand(a["self"], dtype)])


# ----------------------------------------------------------------------------- unary
def _unary(op, **attrs):
    def convert(ctx, a):
        return ctx.add(op, [ctx.operand(a["self"], ctx.out_type().dtype)], attrs)
    return convert


_UNARY = {
    ops.NEG: aten.neg, ops.ABS: aten.abs, ops.EXP: aten.exp, ops.LOG: aten.log, ops.SQRT: aten.sqrt,
    ops.RSQRT: aten.rsqrt, ops.RECIPROCAL: aten.reciprocal, ops.TANH: aten.tanh, ops.SIGMOID: aten.sigmoid,
    ops.RELU: aten.relu, ops.SILU: aten.silu, ops.ERF: aten.erf, ops.SIN: aten.sin, ops.COS: aten.cos,
    ops.FLOOR: aten.floor,
}
for _op, _packet in _UNARY.items():
    converts(_packet)(_unary(_op))


@converts(aten.gelu.default)
def _gelu(ctx, a):
    return ctx.add(ops.GELU, [ctx.operand(a["self"], ctx.out_type().dtype)], {"approximate": a["approximate"]})


def _clip(ctx, x, low, high):
    if isinstance(low, torch.fx.Node) or isinstance(high, torch.fx.Node):
        ctx.unsupported("clamp with tensor bounds")
    bounds = {k: float(v) for k, v in (("min", low), ("max", high)) if v is not None}
    return ctx.add(ops.CLIP, [ctx.operand(x, ctx.out_type().dtype)], bounds)


converts(aten.clamp.default)(lambda ctx, a: _clip(ctx, a["self"], a["min"], a["max"]))
converts(aten.clamp_min.default)(lambda ctx, a: _clip(ctx, a["self"], a["min"], None))
converts(aten.clamp_max.default)(lambda ctx, a: _clip(ctx, a["self"], None, a["max"]))
converts(aten.hardtanh.default)(lambda ctx, a: _clip(ctx, a["self"], a["min_val"], a["max_val"]))
converts(aten.relu6.default)(lambda ctx, a: _clip(ctx, a["self"], 0.0, 6.0))


@converts(aten.log1p.default)
def _log1p(ctx, a):
    """log(1 + x)."""
    dtype = ctx.out_type().dtype
    return ctx.add(ops.LOG, [ctx.add(ops.ADD, [ctx.operand(a["self"], dtype), ctx.constant(1, dtype)])])


@converts(aten.expm1.default)
def _expm1(ctx, a):
    """exp(x) - 1."""
    dtype = ctx.out_type().dtype
    return ctx.add(ops.SUB, [ctx.add(ops.EXP, [ctx.operand(a["self"], dtype)]), ctx.constant(1, dtype)])


@converts(aten.leaky_relu.default)
def _leaky_relu(ctx, a):
    """x if x > 0 else slope * x."""
    dtype = ctx.out_type().dtype
    x = ctx.operand(a["self"], dtype)
    scaled = ctx.add(ops.MUL, [x, ctx.constant(a["negative_slope"], dtype)])
    return ctx.add(ops.WHERE, [ctx.add(ops.GT, [x, ctx.constant(0, dtype)]), x, scaled])


# ----------------------------------------------------------------------------- casts and copies
@converts(aten._to_copy.default, aten.to, aten.type_as.default)
def _to(ctx, a):
    return ctx.cast(ctx.tensor(a["self"]), ctx.out_type().dtype)


@converts(aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
          aten.contiguous.default, aten.dropout.default)
def _identity(ctx, a):
    """Copies, aliases and inference-mode dropout compute nothing: reuse the input value."""
    key = "input" if "input" in a else "self"
    return ctx.tensor(a[key])


# ----------------------------------------------------------------------------- creation
@converts(aten.full.default, aten.full_like.default, aten.new_full.default)
def _full(ctx, a):
    out = ctx.out_type()
    return ctx.constant(a["fill_value"], out.dtype, out.shape)


def _filled(value):
    def convert(ctx, a):
        out = ctx.out_type()
        return ctx.constant(value, out.dtype, out.shape)
    return convert


converts(aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)(_filled(0))
converts(aten.ones.default, aten.ones_like.default, aten.new_ones.default)(_filled(1))
converts(aten.scalar_tensor.default)(lambda ctx, a: ctx.constant(a["s"], ctx.out_type().dtype))


@converts(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(ctx, a):
    """start + step * i; the length is torch's own (symbolic) output size."""
    out = ctx.out_type()
    start, step = a.get("start", 0), a.get("step", 1)
    if isinstance(step, (torch.fx.Node, torch.SymInt)):
        ctx.unsupported("arange with a symbolic step")
    if isinstance(start, (torch.fx.Node, torch.SymInt)):
        base = ctx.add(ops.ARANGE, [], {"length": out.shape[0], "step": float(step), "dtype": out.dtype})
        return ctx.add(ops.ADD, [base, ctx.size_scalar(ctx.dim(start), out.dtype)])
    return ctx.add(ops.ARANGE, [], {"length": out.shape[0], "start": float(start), "step": float(step),
                                    "dtype": out.dtype})


# ----------------------------------------------------------------------------- reductions
def _axes(dim, rank):
    if dim is None:
        return ()
    return tuple(d % rank for d in ([dim] if isinstance(dim, int) else dim))


def _reduce(op, *, cast_input=True):
    def convert(ctx, a):
        x = ctx.tensor(a["self"])
        if cast_input:
            x = ctx.cast(x, ctx.out_type().dtype)
        axes = _axes(a.get("dim"), ctx.type(x).rank)
        return ctx.add(op, [x], {"axes": axes, "keepdims": bool(a.get("keepdim", False))})
    return convert


for _op, _packet in ((ops.SUM, aten.sum), (ops.MEAN, aten.mean), (ops.PROD, aten.prod),
                     (ops.MAX, aten.amax), (ops.MIN, aten.amin)):
    converts(_packet)(_reduce(_op))
converts(aten.max.default)(_reduce(ops.MAX))
converts(aten.min.default)(_reduce(ops.MIN))
converts(aten.any)(_reduce(ops.ANY, cast_input=False))
converts(aten.all)(_reduce(ops.ALL, cast_input=False))


@converts(aten.argmax.default)
def _argmax(ctx, a):
    x = ctx.tensor(a["self"])
    if a["dim"] is None:
        x = ctx.add(ops.RESHAPE, [x], {"shape": (ctx.type(x).numel(),)})
        return ctx.add(ops.ARGMAX, [x], {"axis": 0})
    return ctx.add(ops.ARGMAX, [x], {"axis": a["dim"], "keepdims": bool(a["keepdim"])})


@converts(aten.max.dim, aten.min.dim)
def _max_dim(ctx, a):
    """max.dim returns (values, indices); indices via argmax of the value (or of -x for min)."""
    x = ctx.tensor(a["self"])
    is_max = ctx.node.target is aten.max.dim
    keep = bool(a["keepdim"])
    values = ctx.add(ops.MAX if is_max else ops.MIN, [x], {"axes": (a["dim"],), "keepdims": keep})
    key = x if is_max else ctx.add(ops.NEG, [x])
    return values, ctx.add(ops.ARGMAX, [key], {"axis": a["dim"], "keepdims": keep})


@converts(aten.cumsum.default)
def _cumsum(ctx, a):
    x = ctx.cast(ctx.tensor(a["self"]), ctx.out_type().dtype)
    return ctx.add(ops.CUMSUM, [x], {"axis": a["dim"] % ctx.type(x).rank})


def _softmax(log):
    def convert(ctx, a):
        x = ctx.cast(ctx.tensor(a["self"]), ctx.out_type().dtype)
        return ctx.add(ops.SOFTMAX, [x], {"axis": a["dim"] % ctx.type(x).rank, "log": log})
    return convert


converts(aten.softmax.int, aten._softmax.default)(_softmax(False))
converts(aten.log_softmax.int, aten._log_softmax.default)(_softmax(True))

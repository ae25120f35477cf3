"""Data movement: reshape, transpose, broadcast, concat, slice, take (gather), and the source ops
that create tensors from attributes alone (scalar constants, filled tensors, ranges)."""

from __future__ import annotations

import numpy as np

from slimgraph.compiler.ops.registry import AttrKind, AttrSpec, OpCategory, OpDef, register
from slimgraph.compiler.types import (
    DType, TensorType, broadcast_shapes, dim_add, dim_floordiv, dim_mul, dim_sub, dims_equal,
)

LAYOUT = OpCategory.LAYOUT


def _reshape_infer(inputs, attrs):
    x = inputs[0]
    shape = attrs["shape"]
    if not dims_equal(x.numel(), dim_mul(*shape) if shape else 1):
        raise ValueError(f"cannot reshape {x} to [{','.join(map(str, shape))}]")
    return x.with_shape(shape)


RESHAPE = register(OpDef(
    "reshape", LAYOUT, _reshape_infer, lambda ins, a, ctx: ins[0].reshape(ctx.out_shape),
    attrs=(AttrSpec("shape", AttrKind.DIMS, required=True),),
))


def _transpose_infer(inputs, attrs):
    x = inputs[0]
    perm = attrs["perm"]
    if sorted(perm) != list(range(x.rank)):
        raise ValueError(f"perm {list(perm)} is not a permutation of {x.rank} axes")
    return x.with_shape(tuple(x.shape[p] for p in perm))


TRANSPOSE = register(OpDef(
    "transpose", LAYOUT, _transpose_infer, lambda ins, a, ctx: np.transpose(ins[0], a["perm"]),
    attrs=(AttrSpec("perm", AttrKind.INTS, required=True),),
))


def _broadcast_infer(inputs, attrs):
    x = inputs[0]
    target = attrs["shape"]
    if broadcast_shapes(x.shape, target) != tuple(target):
        raise ValueError(f"cannot broadcast {x} to [{','.join(map(str, target))}]")
    return x.with_shape(target)


BROADCAST_TO = register(OpDef(
    "broadcast_to", LAYOUT, _broadcast_infer,
    lambda ins, a, ctx: np.broadcast_to(ins[0], ctx.out_shape),
    attrs=(AttrSpec("shape", AttrKind.DIMS, required=True),),
))


def _concat_infer(inputs, attrs):
    first = inputs[0]
    axis = attrs["axis"] % first.rank
    total = 0
    for t in inputs:
        if t.rank != first.rank or t.dtype != first.dtype:
            raise ValueError(f"concat inputs differ: {first} vs {t}")
        for i, (a, b) in enumerate(zip(first.shape, t.shape)):
            if i != axis and not dims_equal(a, b):
                raise ValueError(f"concat inputs differ off axis {axis}: {first} vs {t}")
        total = dim_add(total, t.shape[axis])
    return first.with_shape(first.shape[:axis] + (total,) + first.shape[axis + 1:])


CONCAT = register(OpDef(
    "concat", LAYOUT, _concat_infer, lambda ins, a, ctx: np.concatenate(ins, axis=a["axis"]),
    attrs=(AttrSpec("axis", AttrKind.INT, required=True),), arity=None,
))


def _slice_infer(inputs, attrs):
    x = inputs[0]
    axis = attrs["axis"] % x.rank
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    if step < 1:
        raise ValueError(f"slice step must be >= 1, got {step}")
    length = dim_floordiv(dim_add(dim_sub(end, start), step - 1), step)
    return x.with_shape(x.shape[:axis] + (length,) + x.shape[axis + 1:])


def _slice_ref(ins, attrs, ctx):
    x = ins[0]
    axis = attrs["axis"] % x.ndim
    index = [slice(None)] * x.ndim
    index[axis] = slice(ctx.dim(attrs["start"]), ctx.dim(attrs["end"]), attrs["step"])
    return x[tuple(index)]


SLICE = register(OpDef(
    "slice", LAYOUT, _slice_infer, _slice_ref,
    attrs=(AttrSpec("axis", AttrKind.INT, required=True), AttrSpec("start", AttrKind.DIM, 0),
           AttrSpec("end", AttrKind.DIM, required=True), AttrSpec("step", AttrKind.INT, 1)),
    doc="start/end are already clamped to [0, dim] by the frontend",
))


def _take_infer(inputs, attrs):
    data, index = inputs
    if index.dtype not in (DType.i64, DType.i32):
        raise ValueError(f"take index must be integer, got {index.dtype}")
    axis = attrs["axis"] % data.rank
    return data.with_shape(data.shape[:axis] + index.shape + data.shape[axis + 1:])


def _take_ref(ins, attrs, ctx):
    data, index = ins
    axis = attrs["axis"] % data.ndim
    dim = data.shape[axis]
    if index.size and (index.min() < -dim or index.max() >= dim):
        raise IndexError(f"take index out of range [{-dim}, {dim}) on axis {axis}")
    return np.take(data, index, axis=axis)


TAKE = register(OpDef(
    "take", LAYOUT, _take_infer, _take_ref,
    attrs=(AttrSpec("axis", AttrKind.INT, 0),), arity=2,
    doc="numpy.take: gathers whole slices along `axis` (embedding lookup is take on axis 0)",
))


def _gather_elements_infer(inputs, attrs):
    data, index = inputs
    if data.rank != index.rank:
        raise ValueError(f"gather_elements rank mismatch {data} vs {index}")
    return data.with_shape(index.shape)


def _gather_elements_ref(ins, attrs, ctx):
    """out[.., i, ..] = data[.., index[.., i, ..], ..] over index's shape (data may be larger off-axis)."""
    data, index = ins
    axis = attrs["axis"] % data.ndim
    window = tuple(slice(None) if i == axis else slice(0, n) for i, n in enumerate(index.shape))
    return np.take_along_axis(data[window], index, axis=axis)


GATHER_ELEMENTS = register(OpDef(
    "gather_elements", LAYOUT, _gather_elements_infer, _gather_elements_ref,
    attrs=(AttrSpec("axis", AttrKind.INT, required=True),), arity=2,
))


def _pad_infer(inputs, attrs):
    x = inputs[0]
    pads = attrs["pads"]
    if len(pads) != 2 * x.rank:
        raise ValueError(f"pad needs {2 * x.rank} values, got {len(pads)}")
    return x.with_shape(tuple(dim_add(d, pads[2 * i] + pads[2 * i + 1]) for i, d in enumerate(x.shape)))


PAD = register(OpDef(
    "pad", LAYOUT, _pad_infer,
    lambda ins, a, ctx: np.pad(ins[0], [(a["pads"][2 * i], a["pads"][2 * i + 1]) for i in range(ins[0].ndim)],
                               constant_values=a["value"]),
    attrs=(AttrSpec("pads", AttrKind.INTS, required=True), AttrSpec("value", AttrKind.FLOAT, 0.0)),
    doc="pads = (before_0, after_0, before_1, after_1, ...)",
))


# ----------------------------------------------------------------------------- sources
SOURCE = OpCategory.SOURCE


def _constant_ref(ins, attrs, ctx):
    return np.full(ctx.out_shape, attrs["value"], dtype=ctx.out_dtype.numpy)


CONSTANT = register(OpDef(
    "constant", SOURCE, lambda ins, a: TensorType(a["dtype"], a["shape"]), _constant_ref,
    attrs=(AttrSpec("value", AttrKind.FLOAT, required=True), AttrSpec("dtype", AttrKind.DTYPE, required=True),
           AttrSpec("shape", AttrKind.DIMS, ())),
    arity=0, doc="a tensor filled with one value (a scalar when shape is [])",
))


def _arange_infer(ins, attrs):
    return TensorType(attrs["dtype"], (attrs["length"],))


def _arange_ref(ins, attrs, ctx):
    n = ctx.out_shape[0]
    return (attrs["start"] + attrs["step"] * np.arange(n)).astype(ctx.out_dtype.numpy)


ARANGE = register(OpDef(
    "arange", SOURCE, _arange_infer, _arange_ref,
    attrs=(AttrSpec("length", AttrKind.DIM, required=True), AttrSpec("start", AttrKind.FLOAT, 0.0),
           AttrSpec("step", AttrKind.FLOAT, 1.0), AttrSpec("dtype", AttrKind.DTYPE, DType.i64)),
    arity=0, doc="start + step * i for i in [0, length)",
))

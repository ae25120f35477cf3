"""ONNX converters for shapes and layout: Shape, Size, Reshape, Flatten, Transpose, (Un)Squeeze,
Concat, Slice, Gather(Elements/ND), Expand, Tile, Split and Pad.

Shape values are known at import time (see :mod:`onnx_context`), so a reshape whose target comes
from a ``Shape -> Gather -> Unsqueeze -> Concat`` subgraph becomes a static reshape with symbolic dims.
"""

from __future__ import annotations

import numpy as np
import sympy

from slimgraph.compiler import ops
from slimgraph.compiler.errors import ShapeMismatchError, UnsupportedError
from slimgraph.compiler.frontends.onnx_context import (
    NodeContext, Val, as_dim, converter, dims_array, normalize, small_static, to_dims,
)
from slimgraph.compiler.types import (
    DType, broadcast_shapes, dim_add, dim_expr, dim_mul, dims_equal,
)

INT64_NEAR_MAX = 2 ** 62  # ONNX exporters write INT64_MAX (or similar) for "to the end"


@converter("Shape")
def convert_shape(ctx: NodeContext) -> Val:
    """The input's shape, known from its type (symbolic entries are sympy expressions)."""
    shape = dims_array(ctx.input(0).shape)
    rank = len(shape)
    start, end = ctx.attr("start", 0), ctx.attr("end", rank)
    return ctx.const(shape[start:end], DType.i64)


@converter("Size")
def convert_size(ctx: NodeContext) -> Val:
    return ctx.const(dims_array((ctx.input(0).type.numel(),)).reshape(()), DType.i64)


def _reshape_target(ctx: NodeContext, x: Val, spec: np.ndarray) -> tuple:
    """ONNX reshape spec -> dims: 0 copies the input dim (unless allowzero), -1 is inferred."""
    allow_zero = ctx.attr("allowzero", 0)
    dims: list = []
    for i, entry in enumerate(spec.reshape(-1)):
        entry = sympy.sympify(int(entry) if isinstance(entry, np.integer) else entry)
        if entry == 0 and not allow_zero:
            dims.append(x.shape[i])
        elif entry == -1:
            dims.append(None)
        else:
            dims.append(as_dim(entry, ctx.where))
    if None in dims:
        known = dim_mul(*[d for d in dims if d is not None]) if len(dims) > 1 else 1
        inferred = sympy.simplify(dim_expr(x.type.numel()) / dim_expr(known))
        if not inferred.is_integer:
            raise ShapeMismatchError(f"{ctx.where}: cannot reshape {x.type} to {spec.tolist()} "
                                     f"(-1 would be {inferred})")
        dims[dims.index(None)] = as_dim(inferred, ctx.where)
    return tuple(dims)


@converter("Reshape")
def convert_reshape(ctx: NodeContext) -> Val:
    x = ctx.input(0)
    return ctx.reshape(x, _reshape_target(ctx, x, ctx.known(1, "shape")))


@converter("Flatten")
def convert_flatten(ctx: NodeContext) -> Val:
    """[d0..dn] -> [d0*..*d(axis-1), d(axis)*..*dn]."""
    x = ctx.input(0)
    axis = ctx.attr("axis", 1) % (x.rank + 1)
    return ctx.reshape(x, (dim_mul(1, *x.shape[:axis]), dim_mul(1, *x.shape[axis:])))


@converter("Transpose")
def convert_transpose(ctx: NodeContext) -> Val:
    x = ctx.input(0)
    perm = tuple(ctx.attr("perm", list(range(x.rank))[::-1]))
    if perm == tuple(range(x.rank)):
        return x
    return ctx.fold(lambda a: np.transpose(a, perm), x) or ctx.emit(ops.TRANSPOSE, [x], {"perm": perm})


@converter("Unsqueeze")
def convert_unsqueeze(ctx: NodeContext) -> Val:
    """Insert size-1 axes at `axes` (positions in the output)."""
    x = ctx.input(0)
    axes = ctx.axes(1)
    out_rank = x.rank + len(axes)
    axes = sorted(a % out_rank for a in axes)
    shape = list(x.shape)
    for axis in axes:
        shape.insert(axis, 1)
    return ctx.reshape(x, tuple(shape))


@converter("Squeeze")
def convert_squeeze(ctx: NodeContext) -> Val:
    """Drop the given size-1 axes (all static size-1 axes when none are given)."""
    x = ctx.input(0)
    axes = ctx.axes(1)
    axes = {a % x.rank for a in axes} if axes else {i for i, d in enumerate(x.shape) if d == 1}
    for axis in axes:
        if x.shape[axis] != 1:
            raise ShapeMismatchError(f"{ctx.where}: cannot squeeze axis {axis} of {x.type} (size is not 1)")
    return ctx.reshape(x, tuple(d for i, d in enumerate(x.shape) if i not in axes))


@converter("Concat")
def convert_concat(ctx: NodeContext) -> Val:
    """Concatenate along `axis`, skipping statically empty inputs (e.g. an empty past)."""
    vals = [v for v in ctx.inputs() if v is not None]
    axis = ctx.attr("axis") % vals[0].rank
    non_empty = [v for v in vals if v.shape[axis] != 0] or vals[:1]
    folded = ctx.fold(lambda *arrs: np.concatenate(arrs, axis=axis), *non_empty)
    if folded is not None:
        return folded
    return non_empty[0] if len(non_empty) == 1 else ctx.emit(ops.CONCAT, non_empty, {"axis": axis})


def _clamp_bound(value, dim, step: int, is_end: bool, where: str):
    """Normalize an ONNX slice bound: negative counts from the end, then clamp to [0, dim]; for
    negative steps start is clamped to [0, dim-1] and end to [-1, dim-1]. Symbolic bounds are
    taken as in range."""
    value = as_dim(value, where)
    if not isinstance(value, int):
        return value
    low, high = (0, dim) if step > 0 else (-1 if is_end else 0, dim_add(dim, -1))
    if value >= INT64_NEAR_MAX:
        return high
    if value < 0:
        value = dim_add(dim, value)
    if isinstance(value, int) and value < low:
        return low
    if isinstance(value, int) and isinstance(high, int):
        return min(value, high)
    return value


def _slice_axis(ctx: NodeContext, x: Val, axis: int, start, end, step: int) -> Val:
    dim = x.shape[axis]
    start, end = _clamp_bound(start, dim, step, False, ctx.where), _clamp_bound(end, dim, step, True, ctx.where)
    if step > 0:
        if dims_equal(start, 0) and dims_equal(end, dim) and step == 1:
            return x
        return ctx.emit(ops.SLICE, [x], {"axis": axis, "start": start, "end": end, "step": step})
    if not all(isinstance(v, int) for v in (dim, start, end)):
        raise UnsupportedError(f"{ctx.where}: a negative-step slice needs static bounds, got {start}:{end} of {dim}")
    index = ctx.const(np.arange(dim, dtype=np.int64)[start:end if end >= 0 else None:step])
    return ctx.emit(ops.TAKE, [x, index], {"axis": axis})


@converter("Slice")
def convert_slice(ctx: NodeContext) -> Val:
    """x[starts:ends:steps] along `axes`; bounds may be symbolic (e.g. ends = T from a Shape)."""
    x = ctx.input(0)
    starts, ends = ctx.known(1, "starts").reshape(-1), ctx.known(2, "ends").reshape(-1)
    axes = ctx.known_ints(3, "axes") if ctx.input(3) is not None else list(range(len(starts)))
    steps = ctx.known_ints(4, "steps") if ctx.input(4) is not None else [1] * len(starts)
    if x.const is not None and normalize(np.concatenate([starts, ends])).dtype != object:
        index = [slice(None)] * x.rank
        for axis, start, end, step in zip(axes, starts, ends, steps):
            index[axis % x.rank] = slice(int(start), int(end), step)
        return ctx.const(x.const[tuple(index)], x.dtype)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        x = _slice_axis(ctx, x, axis % x.rank, start, end, step)
    return x


@converter("Gather")
def convert_gather(ctx: NodeContext) -> Val:
    """numpy.take along `axis` (embedding lookups, picking dims out of a shape)."""
    data, index = ctx.input(0), ctx.input(1)
    axis = ctx.attr("axis", 0) % data.rank
    folded = ctx.fold(lambda d, i: np.take(d, i, axis=axis), data, index)
    return folded or ctx.emit(ops.TAKE, [data, index], {"axis": axis})


@converter("GatherElements")
def convert_gather_elements(ctx: NodeContext) -> Val:
    return ctx.emit(ops.GATHER_ELEMENTS, [ctx.input(0), ctx.input(1)], {"axis": ctx.attr("axis", 0) % ctx.input(0).rank})


@converter("GatherND")
def convert_gather_nd(ctx: NodeContext) -> Val:
    """out[p] = data[idx[p, 0], .., idx[p, K-1], ...] (batch_dims=0) as one take on data flattened
    over its first K axes, with linear index sum_k idx_k * stride_k (negative indices wrap)."""
    data, index = ctx.input(0), ctx.input(1)
    if ctx.attr("batch_dims", 0):
        raise UnsupportedError(f"{ctx.where}: GatherND with batch_dims > 0 is not supported")
    depth = index.shape[-1]
    if not isinstance(depth, int) or depth > data.rank:
        raise ShapeMismatchError(f"{ctx.where}: index depth {depth} does not fit data {data.type}")
    lead = data.shape[:depth]
    strides = dims_array([dim_mul(1, *lead[k + 1:]) for k in range(depth)])
    wrapped = ctx.emit(ops.WHERE, [
        ctx.emit(ops.LT, [index, ctx.const(np.zeros((), np.int64))]),
        ctx.emit(ops.ADD, [index, ctx.const(dims_array(lead), index.dtype)]), index])
    linear = ctx.emit(ops.SUM, [ctx.emit(ops.MUL, [wrapped, ctx.const(strides, index.dtype)])],
                      {"axes": (index.rank - 1,)})
    flat = ctx.reshape(data, (dim_mul(1, *lead),) + tuple(data.shape[depth:]))
    return ctx.emit(ops.TAKE, [flat, linear], {"axis": 0})


@converter("Expand")
def convert_expand(ctx: NodeContext) -> Val:
    """Bidirectional broadcast of x against the target shape."""
    x = ctx.input(0)
    target = to_dims(ctx.known(1, "shape"), ctx.where)
    try:
        shape = broadcast_shapes(x.shape, target)
    except ValueError as exc:
        raise ShapeMismatchError(f"{ctx.where}: {exc}") from None
    if shape == tuple(x.shape):
        return x
    folded = ctx.fold(lambda a: np.broadcast_to(a, shape).copy(), x) if small_static(shape) else None
    return folded or ctx.emit(ops.BROADCAST_TO, [x], {"shape": shape})


@converter("Tile")
def convert_tile(ctx: NodeContext) -> Val:
    """tile(x, r): view x as [1,d0,1,d1,..], broadcast to [r0,d0,r1,d1,..], merge pairs."""
    x = ctx.input(0)
    repeats = ctx.known_ints(1, "repeats")
    if all(r == 1 for r in repeats):
        return x
    if small_static(x.shape) and x.const is not None:
        return ctx.const(np.tile(x.const, repeats), x.dtype)
    paired = tuple(d for dim in x.shape for d in (1, dim))
    spread = tuple(d for r, dim in zip(repeats, x.shape) for d in (r, dim))
    out = ctx.emit(ops.BROADCAST_TO, [ctx.reshape(x, paired)], {"shape": spread})
    return ctx.reshape(out, tuple(dim_mul(r, d) for r, d in zip(repeats, x.shape)))


@converter("Split")
def convert_split(ctx: NodeContext) -> list[Val]:
    """Split along `axis` into the given sizes (input 1 or attribute), or equal parts."""
    x = ctx.input(0)
    axis = ctx.attr("axis", 0) % x.rank
    sizes = ctx.axes(1, "split")
    if sizes is None:
        parts = ctx.attr("num_outputs", len(ctx.node.output))
        dim = x.shape[axis]
        if not isinstance(dim, int):
            raise UnsupportedError(f"{ctx.where}: equal Split of the symbolic dim {dim} is not supported")
        chunk = -(-dim // parts)
        sizes = [min(chunk, dim - i * chunk) for i in range(parts)]
    outs, start = [], 0
    for size in sizes:
        end = start + size
        folded = ctx.fold(lambda a, s=start, e=end: np.take(a, np.arange(s, e), axis=axis), x)
        outs.append(folded or ctx.emit(ops.SLICE, [x], {"axis": axis, "start": start, "end": end}))
        start = end
    return outs


@converter("Pad")
def convert_pad(ctx: NodeContext) -> Val:
    """Constant padding; ONNX pads [b0, b1, .., e0, e1, ..] become IR (b0, e0, b1, e1, ..)."""
    x = ctx.input(0)
    if ctx.attr("mode", "constant") != "constant":
        raise UnsupportedError(f"{ctx.where}: Pad mode {ctx.attr('mode')!r} is not supported (only constant)")
    pads = ctx.known_ints(1, "pads")
    axes = ctx.known_ints(3, "axes") if ctx.input(3) is not None else list(range(x.rank))
    value = float(ctx.known(2, "constant_value").reshape(-1)[0]) if ctx.input(2) is not None else 0.0
    if any(p < 0 for p in pads):
        raise UnsupportedError(f"{ctx.where}: negative pads (cropping) are not supported")
    ir_pads = [0] * (2 * x.rank)
    for i, axis in enumerate(a % x.rank for a in axes):
        ir_pads[2 * axis], ir_pads[2 * axis + 1] = pads[i], pads[i + len(axes)]
    return ctx.emit(ops.PAD, [x], {"pads": tuple(ir_pads), "value": value})

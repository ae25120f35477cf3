"""ATen -> slimgraph converters for data movement: views, permutes, slicing, indexing, concat.

Output shapes come from torch's fake-tensor metadata (already symbolic, ``-1`` resolved), so a
view / unsqueeze / flatten is just ``reshape`` to that shape.
"""

from __future__ import annotations

from slimgraph.compiler import ops
from slimgraph.compiler.frontends.torch_context import aten, converts
from slimgraph.compiler.types import broadcast_shapes, dim_add, dim_mul, dim_sub



@converts(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
          aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.view_as.default,
          aten.unflatten.int)
def _reshape(ctx, a):
    x = ctx.tensor(a["self"])
    shape = ctx.out_type().shape
    if ctx.type(x).shape == shape:
        return x
    return ctx.add(ops.RESHAPE, [x], {"shape": shape})


@converts(aten.permute.default)
def _permute(ctx, a):
    x = ctx.tensor(a["self"])
    rank = ctx.type(x).rank
    return ctx.add(ops.TRANSPOSE, [x], {"perm": [d % rank for d in a["dims"]]})


@converts(aten.transpose.int, aten.t.default, aten.numpy_T.default)
def _transpose(ctx, a):
    x = ctx.tensor(a["self"])
    rank = ctx.type(x).rank
    perm = list(range(rank))
    d0, d1 = (a["dim0"] % rank, a["dim1"] % rank) if "dim0" in a else (0, rank - 1)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return x if d0 == d1 else ctx.add(ops.TRANSPOSE, [x], {"perm": perm})


@converts(aten.expand.default, aten.expand_as.default, aten.broadcast_to.default)
def _expand(ctx, a):
    x = ctx.tensor(a["self"])
    shape = ctx.out_type().shape
    return x if ctx.type(x).shape == shape else ctx.add(ops.BROADCAST_TO, [x], {"shape": shape})


def _start_index(ctx, value, size):
    """A slice start as a dim in [0, size]: None -> 0, negative -> size + value, past the end -> size."""
    if value is None:
        return 0
    value = ctx.dim(value)
    if isinstance(value, int):
        if value < 0:
            return dim_add(size, value) if isinstance(size, str) else max(size + value, 0)
        return value if isinstance(size, str) or value <= size else size
    return value


@converts(aten.slice.Tensor)
def _slice(ctx, a):
    """x[start:end:step] on one axis; the length is torch's own, so end = start + (len-1)*step + 1."""
    x = ctx.tensor(a["self"])
    t = ctx.type(x)
    axis = a["dim"] % t.rank
    step = a["step"] or 1
    start = _start_index(ctx, a["start"], t.shape[axis])
    length = ctx.out_type().shape[axis]
    if start == 0 and length == t.shape[axis] and step == 1:
        return x
    end = _slice_end(start, length, step)
    return ctx.add(ops.SLICE, [x], {"axis": axis, "start": start, "end": end, "step": step})


def _slice_end(start, length, step):
    """End index of a slice that picks ``length`` elements: start + (length - 1) * step + 1."""
    if step == 1 or length == 0:
        return dim_add(start, length if step == 1 else 0)
    return dim_add(start, dim_add(dim_mul(dim_sub(length, 1), step), 1))


@converts(aten.select.int)
def _select(ctx, a):
    """x.select(dim, i) = slice [i, i+1] then drop the axis."""
    x = ctx.tensor(a["self"])
    t = ctx.type(x)
    axis = a["dim"] % t.rank
    start = _start_index(ctx, a["index"], t.shape[axis])
    piece = ctx.add(ops.SLICE, [x], {"axis": axis, "start": start, "end": dim_add(start, 1)})
    return ctx.add(ops.RESHAPE, [piece], {"shape": ctx.out_type().shape})


@converts(aten.cat.default, aten.concat.default)
def _cat(ctx, a):
    dtype = ctx.out_type().dtype
    parts = [ctx.cast(ctx.tensor(t), dtype) for t in a["tensors"]]
    rank = ctx.out_type().rank
    parts = [p for p in parts if ctx.type(p).rank == rank]  # torch ignores legacy 1-D empty tensors
    return parts[0] if len(parts) == 1 else ctx.add(ops.CONCAT, parts, {"axis": a["dim"] % rank})


@converts(aten.stack.default)
def _stack(ctx, a):
    out = ctx.out_type()
    axis = a["dim"] % out.rank
    parts = []
    for t in a["tensors"]:
        x = ctx.cast(ctx.tensor(t), out.dtype)
        shape = ctx.type(x).shape
        parts.append(ctx.add(ops.RESHAPE, [x], {"shape": shape[:axis] + (1,) + shape[axis:]}))
    return parts[0] if len(parts) == 1 else ctx.add(ops.CONCAT, parts, {"axis": axis})


@converts(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
def _split(ctx, a):
    """Pieces along an axis, sized as torch recorded them (unbind also drops the axis)."""
    x = ctx.tensor(a["self"])
    t = ctx.type(x)
    axis = a.get("dim", 0) % t.rank
    outputs, start, refs = ctx.node.meta["val"], 0, []
    for fake in outputs:
        shape = ctx.shape_of(fake)
        length = shape[axis] if len(shape) == t.rank else 1
        end = dim_add(start, length)
        piece = ctx.add(ops.SLICE, [x], {"axis": axis, "start": start, "end": end})
        refs.append(piece if len(shape) == t.rank else ctx.add(ops.RESHAPE, [piece], {"shape": shape}))
        start = end
    return tuple(refs)


@converts(aten.embedding.default)
def _embedding(ctx, a):
    return ctx.add(ops.TAKE, [ctx.tensor(a["weight"]), ctx.tensor(a["indices"])], {"axis": 0})


@converts(aten.index_select.default)
def _index_select(ctx, a):
    return ctx.add(ops.TAKE, [ctx.tensor(a["self"]), ctx.tensor(a["index"])], {"axis": a["dim"]})


@converts(aten.gather.default)
def _gather(ctx, a):
    return ctx.add(ops.GATHER_ELEMENTS, [ctx.tensor(a["self"]), ctx.tensor(a["index"])], {"axis": a["dim"]})


@converts(aten.index.Tensor)
def _index(ctx, a):
    """Advanced indexing x[i0, i1, ...] with adjacent integer index tensors (numpy semantics).

    The indexed axes are moved to the front; ``take`` gathers with the first index (giving
    [B..., D1, ..., rest]) and each further index picks along its axis with ``gather_elements``
    (index broadcast over the trailing axes). The B axes then move back to where torch puts them.
    """
    x = ctx.tensor(a["self"])
    rank = ctx.type(x).rank
    positions = [i for i, idx in enumerate(a["indices"]) if idx is not None]
    if positions != list(range(positions[0], positions[-1] + 1)):
        ctx.unsupported("non-adjacent index tensors")
    if any(ctx.type(ctx.tensor(a["indices"][p])).dtype.name == "bool" for p in positions):
        ctx.unsupported("boolean mask indexing")
    first = positions[0]
    order = positions + [i for i in range(rank) if i not in positions]
    if order != list(range(rank)):
        x = ctx.add(ops.TRANSPOSE, [x], {"perm": order})
    index_refs = [ctx.tensor(a["indices"][p]) for p in positions]
    batch = _broadcast_index_shape(ctx, index_refs)
    index_refs = [_broadcast(ctx, r, batch) for r in index_refs]
    out = ctx.add(ops.TAKE, [x, index_refs[0]], {"axis": 0})
    nb = len(batch)
    for idx in index_refs[1:]:
        rest = ctx.type(out).shape[nb + 1:]
        expanded = ctx.add(ops.RESHAPE, [idx], {"shape": batch + (1,) + (1,) * len(rest)})
        expanded = _broadcast(ctx, expanded, batch + (1,) + rest)
        picked = ctx.add(ops.GATHER_ELEMENTS, [out, expanded], {"axis": nb})
        out = ctx.add(ops.RESHAPE, [picked], {"shape": batch + rest})
    if first > 0:
        perm = list(range(nb, nb + first)) + list(range(nb)) + list(range(nb + first, ctx.type(out).rank))
        out = ctx.add(ops.TRANSPOSE, [out], {"perm": perm})
    return out


def _broadcast(ctx, ref, shape):
    return ref if ctx.type(ref).shape == tuple(shape) else ctx.add(ops.BROADCAST_TO, [ref], {"shape": shape})


def _broadcast_index_shape(ctx, refs):
    return broadcast_shapes(*(ctx.type(r).shape for r in refs))


@converts(aten.repeat.default)
def _repeat(ctx, a):
    """x.repeat(r0, r1, ...): reshape to [1, d0, 1, d1, ...], broadcast to [r0, d0, ...], merge pairs."""
    x = ctx.tensor(a["self"])
    repeats = [ctx.dim(r) for r in a["repeats"]]
    shape = (1,) * (len(repeats) - ctx.type(x).rank) + ctx.type(x).shape
    split = tuple(d for s in shape for d in (1, s))
    tiled = tuple(d for r, s in zip(repeats, shape) for d in (r, s))
    y = ctx.add(ops.RESHAPE, [x], {"shape": split})
    y = ctx.add(ops.BROADCAST_TO, [y], {"shape": tiled})
    return ctx.add(ops.RESHAPE, [y], {"shape": ctx.out_type().shape})


@converts(aten.constant_pad_nd.default, aten.pad.default)
def _pad(ctx, a):
    """torch pads the last axis first: (last_lo, last_hi, prev_lo, prev_hi, ...)."""
    if a.get("mode", "constant") != "constant":
        ctx.unsupported(f"{a['mode']} padding")
    x = ctx.tensor(a["self"])
    rank = ctx.type(x).rank
    pads = [0] * (2 * rank)
    for i in range(len(a["pad"]) // 2):
        axis = rank - 1 - i
        pads[2 * axis], pads[2 * axis + 1] = a["pad"][2 * i], a["pad"][2 * i + 1]
    if any(p < 0 for p in pads):
        ctx.unsupported("negative padding (cropping)")
    return ctx.add(ops.PAD, [x], {"pads": pads, "value": float(a["value"] or 0.0)})


@converts(aten.diff.default)
def _diff(ctx, a):
    """n-th forward difference along dim, with optional prepend/append: y[i] = x[i+1] - x[i]."""
    x = ctx.tensor(a["self"])
    axis = a["dim"] % ctx.type(x).rank
    parts = [ctx.tensor(p) for p in (a["prepend"], a["self"], a["append"]) if p is not None]
    x = parts[0] if len(parts) == 1 else ctx.add(ops.CONCAT, parts, {"axis": axis})
    is_bool = ctx.type(x).dtype.name == "bool"
    for _ in range(a["n"]):
        size = ctx.type(x).shape[axis]
        later = ctx.add(ops.SLICE, [x], {"axis": axis, "start": 1, "end": size})
        earlier = ctx.add(ops.SLICE, [x], {"axis": axis, "start": 0, "end": dim_sub(size, 1)})
        x = ctx.add(ops.NE if is_bool else ops.SUB, [later, earlier])
    return x


def _triangle(lower: bool):
    """tril/triu: keep x where (col - row) <= k (tril) or >= k (triu), else 0."""
    def convert(ctx, a):
        x = ctx.tensor(a["self"])
        shape = ctx.type(x).shape
        rows = ctx.add(ops.ARANGE, [], {"length": shape[-2]})
        rows = ctx.add(ops.RESHAPE, [rows], {"shape": (shape[-2], 1)})
        cols = ctx.add(ops.ARANGE, [], {"length": shape[-1]})
        offset = ctx.add(ops.SUB, [cols, rows])
        diagonal = ctx.constant(a["diagonal"], ctx.type(offset).dtype)
        keep = ctx.add(ops.LE if lower else ops.GE, [offset, diagonal])
        return ctx.add(ops.WHERE, [keep, x, ctx.constant(0, ctx.type(x).dtype)])
    return convert


converts(aten.tril.default)(_triangle(True))
converts(aten.triu.default)(_triangle(False))
converts(aten.lift_fresh.default)(lambda ctx, a: ctx.tensor(a["self"]))

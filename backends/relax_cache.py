"""Lowering of the key/value-cache ops (``slimgraph.compiler.ops.cache``).

* ``kv_cache_write`` becomes ``R.call_tir_inplace`` of a kernel that loops over the T new rows
  only and stores them at rows ``[end - T, end)`` of the cache argument itself: the call's result
  is the cache tensor passed in, so a decode step writes ``kv_heads * head_dim`` values per layer
  and copies nothing else. ``end`` reaches the kernel as a scalar argument.
* ``cache_attention`` becomes four kernels: scores ``q k^T`` over the first L cache rows
  (float32 accumulation), the scale with the causal and padding mask, a float32 softmax, and the
  probability-weighted sum of value rows. The r query heads that share cache head g
  (``h = g * r + s``) are stacked as the r*T query rows of g (a reshape of ``q``), so each cache
  head's K and V are read in place by one batched product, never repeated per query head.
"""

from __future__ import annotations

from tvm import relax, te, tirx
from tvm.script import tirx as T

from slimgraph.backends.relax_lowering import TVM_DTYPES, lowering
from slimgraph.compiler import ops

CACHE_WRITE_ATTR = "slimgraph.kv_cache_write"


def _write_kernel(dtype: str, shape: tuple) -> tirx.PrimFunc:
    """In-place store of ``new [B, H, t, D]`` into ``cache [B, H, S, D]`` at rows ``end - t + i``."""
    b, h, s, d = shape

    @T.prim_func(private=True, s_tir=True)
    def kv_cache_write(var_cache: T.handle, var_new: T.handle, end: T.int64):
        T.func_attr({"tirx.noalias": True, CACHE_WRITE_ATTR: True})
        t = T.int64()
        cache = T.match_buffer(var_cache, (b, h, s, d), dtype)
        new = T.match_buffer(var_new, (b, h, t, d), dtype)
        for i0, i1, i2, i3 in T.grid(b, h, t, d):
            with T.sblock("kv_cache_write"):
                vb, vh, vt, vd = T.axis.remap("SSSS", [i0, i1, i2, i3])
                cache[vb, vh, end - t + vt, vd] = new[vb, vh, vt, vd]

    return kv_cache_write


@lowering(ops.KV_CACHE_WRITE)
def _kv_cache_write(ctx, args):
    cache_type = ctx.in_types[0]
    if not cache_type.is_static:
        raise ValueError(f"node {ctx.node.name}: the cache {cache_type} needs a static shape")
    kernel = _write_kernel(TVM_DTYPES[cache_type.dtype], tuple(int(x) for x in cache_type.shape))
    gvar = ctx.builder.add_func(kernel, "kv_cache_write")
    sinfo = ctx.symbols.relax_type(cache_type)
    end = relax.prim_value(ctx.prim(ctx.node.attr("end")))
    return relax.call_tir_inplace(gvar, [*args, end], inplace_indices=[0], out_ty=sinfo)


def _scores(q, k, length):
    """``q k^T`` over the first ``length`` cache rows, in float32, with the query heads that share a
    cache head stacked as rows (q: ``[B, Hk, r*T, D]``): a plain contraction with affine indices
    and no epilogue, the form the CPU dot-product and GPU reduction schedules take."""
    batch, kv_heads, rows, d = q.shape
    rd = te.reduce_axis((0, d), name="d")
    return te.compute((batch, kv_heads, rows, length), lambda b, h, m, j: te.sum(
        q[b, h, m, rd].astype("float32") * k[b, h, j, rd].astype("float32"), axis=rd), name="cache_scores")


def _masked(scores, mask, *, t, scale: float):
    """``scale * scores``, -inf where key j comes after the query of row m (position
    ``L - T + m % T``) or is padding."""
    length = scores.shape[3]

    def element(b, h, m, j):
        keep = tirx.all(j <= length - t + tirx.floormod(m, t), mask[b, j] != tirx.const(0, mask.dtype))
        return tirx.Select(keep, scores[b, h, m, j] * tirx.const(scale, "float32"), tirx.const(float("-inf"), "float32"))

    return te.compute(scores.shape, element, name="cache_mask")


def _weighted_values(probs, v, *, dtype: str):
    """``sum_j probs[b,h,m,j] * v[b,h,j,:]`` in float32, stored as ``dtype``."""
    batch, kv_heads, rows, length = probs.shape
    rj = te.reduce_axis((0, length), name="j")
    acc = te.compute((batch, kv_heads, rows, v.shape[3]), lambda b, h, m, e: te.sum(
        probs[b, h, m, rj] * v[b, h, rj, e].astype("float32"), axis=rj), name="cache_values")
    if dtype == "float32":
        return acc
    return te.compute(acc.shape, lambda *i: acc(*i).astype(dtype), name="cache_values_cast")


@lowering(ops.CACHE_ATTENTION)
def _cache_attention(ctx, args):
    q, k, v, mask = args
    qt, kt = ctx.in_types[0], ctx.in_types[1]
    batch, heads, t, d = (ctx.prim(x) for x in qt.shape)
    kv_heads, rep = kt.shape[1], qt.shape[1] // kt.shape[1]
    stacked = ctx.emit(relax.op.reshape(q, [batch, ctx.prim(kv_heads), t * rep, d]))
    length, scale = ctx.prim(ctx.in_types[3].shape[1]), ctx.node.attr("scale")
    scores = ctx.emit(ctx.builder.call_te(lambda a, b: _scores(a, b, length), stacked, k,
                                          primfunc_name_hint="cache_scores"))
    # t goes in as an argument: a symbolic T that no kernel buffer shape binds (L = T + past) becomes
    # a scalar parameter of the kernel instead of a dangling variable of the caller.
    masked = ctx.emit(ctx.builder.call_te(lambda s_, m, rows: _masked(s_, m, t=rows, scale=scale), scores, mask, t,
                                          primfunc_name_hint="cache_mask"))
    probs = ctx.emit(relax.op.nn.softmax(masked, axis=-1))
    dtype = TVM_DTYPES[ctx.node.type.dtype]
    out = ctx.emit(ctx.builder.call_te(lambda p, b: _weighted_values(p, b, dtype=dtype), probs, v,
                                       primfunc_name_hint="cache_values"))
    return relax.op.reshape(out, ctx.out_shape())

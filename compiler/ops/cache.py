"""Key/value-cache ops of generation: ``kv_cache_write`` and ``cache_attention``.

A causal LM compiled for generation keeps, per layer, a key and a value cache ``[B, Hk, S, D]`` of a
static maximum context ``S``, allocated once by the runtime and passed to every call. ``L`` tokens of
it are valid after a call, ``T`` of which came with that call.

* ``kv_cache_write(cache, new) {end}`` with ``new: [B, Hk, T, D]``::

      out = cache;  out[:, :, end - T : end, :] = new

  Its value *is* the cache tensor: the backend writes the T new rows in place, so the rest of the
  cache is never copied (the op stays out of fusion groups).
* ``cache_attention(q, k_cache, v_cache, attention_mask) {scale}`` with ``q: [B, H, T, D]``,
  ``attention_mask: i64[B, L]`` (1 = attend, 0 = padding) and ``H = r * Hk`` (grouped-query
  attention: query head h reads cache head ``h // r``). Query i sits at position ``p_i = L - T + i``::

      s[b,h,i,j] = scale * sum_d q[b,h,i,d] * k[b, h//r, j, d]       for j < L
      s[b,h,i,j] = -inf   where j > p_i or attention_mask[b, j] == 0
      out[b,h,i,:] = sum_j softmax_j(s[b,h,i,:]) * v[b, h//r, j, :]

  It reads only the first L cache rows, straight from the cache (no per-head copy of K and V).
"""

from __future__ import annotations

import numpy as np

from slimgraph.compiler.ops.registry import AttrKind, AttrSpec, OpCategory, OpDef, register
from slimgraph.compiler.types import DType, TensorType, dims_equal


def _check_cache(cache: TensorType, new: TensorType, what: str) -> None:
    if cache.rank != 4 or new.rank != 4:
        raise ValueError(f"{what} wants [B, heads, positions, head_dim] tensors, got {cache} and {new}")
    if cache.dtype != new.dtype:
        raise ValueError(f"{what}: cache {cache} and new rows {new} differ in dtype")
    for axis in (0, 1, 3):
        if not dims_equal(cache.shape[axis], new.shape[axis]):
            raise ValueError(f"{what}: cache {cache} and new rows {new} differ on axis {axis}")


def _write_infer(inputs, attrs):
    cache, new = inputs
    _check_cache(cache, new, "kv_cache_write")
    return cache


def _write_ref(ins, attrs, ctx):
    cache, new = ins
    end = ctx.dim(attrs["end"])
    start = end - new.shape[2]
    if start < 0 or end > cache.shape[2]:
        raise ValueError(f"kv_cache_write: rows [{start}, {end}) outside a cache of {cache.shape[2]} positions")
    out = np.array(cache, copy=True)
    out[:, :, start:end] = new
    return out


KV_CACHE_WRITE = register(OpDef(
    "kv_cache_write", OpCategory.CACHE, _write_infer, _write_ref, arity=2, foldable=False,
    attrs=(AttrSpec("end", AttrKind.DIM, required=True),),
))


def _attention_infer(inputs, attrs):
    q, k, v, mask = inputs
    _check_cache(k, v, "cache_attention")
    if q.rank != 4 or q.dtype != k.dtype or not dims_equal(q.shape[3], k.shape[3]):
        raise ValueError(f"cache_attention: query {q} does not match the cache {k}")
    if mask.rank != 2 or mask.dtype is not DType.i64:
        raise ValueError(f"cache_attention wants an i64[B, L] attention mask, got {mask}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads:
        raise ValueError(f"cache_attention: {heads} query heads cannot share {kv_heads} cache heads")
    return q


def _attention_ref(ins, attrs, ctx):
    q, k, v, mask = ins
    t, length = q.shape[2], mask.shape[1]
    if length > k.shape[2] or length < t:
        raise ValueError(f"cache_attention: {length} positions with {t} queries in a cache of {k.shape[2]}")
    rep = q.shape[1] // k.shape[1]
    keys = np.repeat(k[:, :, :length].astype(np.float32), rep, axis=1)
    values = np.repeat(v[:, :, :length].astype(np.float32), rep, axis=1)
    scores = np.einsum("bhid,bhjd->bhij", q.astype(np.float32), keys) * np.float32(attrs["scale"])
    position = (length - t + np.arange(t))[:, None]
    keep = (np.arange(length)[None, :] <= position)[None, None] & (mask[:, None, None, :] != 0)
    scores = np.where(keep, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("bhij,bhjd->bhid", probs, values).astype(q.dtype)


CACHE_ATTENTION = register(OpDef(
    "cache_attention", OpCategory.CACHE, _attention_infer, _attention_ref, arity=4,
    attrs=(AttrSpec("scale", AttrKind.FLOAT, required=True),),
))

__all__ = ["KV_CACHE_WRITE", "CACHE_ATTENTION"]

"""Simplify rules that recognize normalizations written with primitives, and batch-norm folding.

Patterns (matched by op identity on the new graph; ``eps`` is a scalar constant or 1-element
weight; every mean/sum/max is over ONE axis with ``keepdims``; RMS/layer norm use the last axis):

* RMSNorm   ``x * rsqrt(mean(x*x) + eps)``  or  ``x / sqrt(mean(x*x) + eps)``  (``x*x`` may be
  ``pow(x, 2)``)  ->  ``rms_norm(x, eps)``; then ``rms_norm(x) * w`` with ``w`` of shape [D]
  -> ``rms_norm(x, w)``.
* LayerNorm ``d * rsqrt(mean(d*d) + eps)`` or ``d / sqrt(mean(d*d) + eps)`` with
  ``d = x - mean(x)`` -> ``layer_norm(x, eps)``; ``* w`` and ``+ b`` (shape [D]) are absorbed.
* softmax   ``exp(x - max(x)) / sum(exp(x - max(x)))`` -> ``softmax(x, axis)``; without the max
  subtraction the same quotient is ``softmax`` too (mathematically equal, numerically safer).
* BatchNorm (inference) after ``conv2d`` with constant weights: with
  ``s = gamma / sqrt(var + eps)``, ``bn(conv(x, W) + c) = conv(x, W * s[o]) + (c - mean) * s + beta``;
  computed in float64 and stored in the conv's dtype as ``<W>.bn`` and ``<W>.bn_bias``.
"""

from __future__ import annotations

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.ir import Node
from slimgraph.passes._rewrite import add_weight, scalar_value


def _last_axis_mean(ctx, ref: str) -> str | None:
    """The input of ``mean(input, axes=[last], keepdims=True)`` producing ``ref``."""
    node = ctx.producer(ref, ops.MEAN)
    if node is None or not node.attrs["keepdims"] or len(node.attrs["axes"]) != 1:
        return None
    rank = node.type.rank
    return node.inputs[0] if node.attrs["axes"][0] % rank == rank - 1 else None


def _squared(ctx, ref: str) -> str | None:
    """``x`` when ``ref`` is ``x * x`` or ``pow(x, 2)``."""
    node = ctx.producer(ref, ops.MUL)
    if node is not None and node.inputs[0] == node.inputs[1]:
        return node.inputs[0]
    node = ctx.producer(ref, ops.POW)
    if node is not None and scalar_value(ctx.rw, node.inputs[1]) == 2.0:
        return node.inputs[0]
    return None


def _mean_square_plus_eps(ctx, ref: str) -> tuple[str, float] | None:
    """(x, eps) when ``ref`` is ``mean(x*x) + eps``."""
    node = ctx.producer(ref, ops.ADD)
    if node is None:
        return None
    for ms, eps_ref in (node.inputs, node.inputs[::-1]):
        eps = scalar_value(ctx.rw, eps_ref)
        mean_input = _last_axis_mean(ctx, ms)
        x = _squared(ctx, mean_input) if mean_input is not None else None
        if eps is not None and x is not None and ctx.rw.type_of(ms).rank == ctx.rw.type_of(x).rank:
            return x, eps
    return None


def _inverse_root(ctx, ref: str, divides: bool) -> tuple[str, float] | None:
    """(x, eps) when ``ref`` is ``rsqrt(mean(x*x) + eps)`` (or ``sqrt(...)`` for a divisor)."""
    node = ctx.producer(ref, ops.SQRT if divides else ops.RSQRT)
    return _mean_square_plus_eps(ctx, node.inputs[0]) if node is not None else None


def _centered(ctx, ref: str) -> str | None:
    """``x`` when ``ref`` is ``x - mean(x)`` over the last axis."""
    node = ctx.producer(ref, ops.SUB)
    if node is None:
        return None
    x, m = node.inputs
    return x if _last_axis_mean(ctx, m) == x else None


def _float_same_type(ctx, node: Node, x: str) -> bool:
    t = ctx.rw.type_of(x)
    return t == node.type and t.dtype.is_float


def _rms(ctx, node, pairs, divides) -> str | None:
    for x, scale in pairs:
        found = _inverse_root(ctx, scale, divides)
        if found is not None and found[0] == x and _float_same_type(ctx, node, x):
            return ctx.rw.add(ops.RMS_NORM, (x,), {"eps": found[1]}, name=node.name)
    return None


def rms_norm_mul(ctx, node, inputs):
    return _rms(ctx, node, (inputs, inputs[::-1]), divides=False)


def rms_norm_div(ctx, node, inputs):
    return _rms(ctx, node, (inputs,), divides=True)


def _layer(ctx, node, pairs, divides) -> str | None:
    for d, scale in pairs:
        x = _centered(ctx, d)
        found = _inverse_root(ctx, scale, divides)
        if x is None or found is None or not _float_same_type(ctx, node, x):
            continue
        if found[0] == d or _centered(ctx, found[0]) == x:
            return ctx.rw.add(ops.LAYER_NORM, (x,), {"eps": found[1]}, name=node.name)
    return None


def layer_norm_mul(ctx, node, inputs):
    return _layer(ctx, node, (inputs, inputs[::-1]), divides=False)


def layer_norm_div(ctx, node, inputs):
    return _layer(ctx, node, (inputs,), divides=True)


def _per_feature(ctx, norm: Node, ref: str) -> bool:
    t, x = ctx.rw.type_of(ref), norm.type
    return t.rank == 1 and t.dtype == x.dtype and t.shape[0] == x.shape[-1]


def norm_times_weight(ctx, node, inputs):
    """``rms_norm(x) * w`` / ``layer_norm(x) * w`` -> the norm op with its weight."""
    for n_ref, w in (inputs, inputs[::-1]):
        norm = ctx.rw.producer(n_ref)
        if (norm is not None and norm.op in (ops.RMS_NORM, ops.LAYER_NORM) and len(norm.inputs) == 1
                and ctx.single_use(n_ref) and _per_feature(ctx, norm, w) and norm.type == node.type):
            return ctx.rw.add(norm.op, (norm.inputs[0], w), dict(norm.attrs.items()), name=node.name)
    return None


def layer_norm_plus_bias(ctx, node, inputs):
    """``layer_norm(x, w) + b`` -> ``layer_norm(x, w, b)``."""
    for n_ref, b in (inputs, inputs[::-1]):
        norm = ctx.producer(n_ref, ops.LAYER_NORM)
        if (norm is not None and len(norm.inputs) == 2 and ctx.single_use(n_ref)
                and _per_feature(ctx, norm, b) and norm.type == node.type):
            return ctx.rw.add(ops.LAYER_NORM, norm.inputs + (b,), dict(norm.attrs.items()), name=node.name)
    return None


def _single_axis(node: Node | None, op) -> int | None:
    """The axis of ``op(..., axes=[a], keepdims=True)`` (normalized to >= 0), else None."""
    if node is None or node.op is not op or not node.attrs["keepdims"] or len(node.attrs["axes"]) != 1:
        return None
    return node.attrs["axes"][0] % node.type.rank


def softmax(ctx, node, inputs):
    """``e / sum(e)`` with ``e = exp(z)``; ``z = x - max(x)`` gives ``softmax(x)``, else ``softmax(z)``."""
    e, s = inputs
    exp = ctx.producer(e, ops.EXP)
    sum_node = ctx.rw.producer(s)
    axis = _single_axis(sum_node, ops.SUM)
    if exp is None or axis is None or sum_node.inputs[0] != e or node.type != ctx.rw.type_of(e):
        return None
    z = exp.inputs[0]
    shift = ctx.producer(z, ops.SUB)
    if shift is not None:
        max_node = ctx.rw.producer(shift.inputs[1])
        if _single_axis(max_node, ops.MAX) == axis and max_node.inputs[0] == shift.inputs[0]:
            z = shift.inputs[0]
    if not ctx.rw.type_of(z).dtype.is_float:
        return None
    return ctx.rw.add(ops.SOFTMAX, (z,), {"axis": axis - node.type.rank}, name=node.name)


def fold_batch_norm(ctx, node, inputs):
    """``batch_norm(conv2d(x, @W[, @c]), ...)`` with constant statistics -> one conv2d."""
    conv = ctx.producer(inputs[0], ops.CONV2D)
    if conv is None or not ctx.single_use(inputs[0]):
        return None
    arrays = [ctx.rw.weight_array(r) for r in conv.inputs[1:] + inputs[1:]]
    if any(a is None for a in arrays):
        return None
    weight = arrays[0]
    bias = arrays[1] if len(conv.inputs) == 3 else np.zeros(weight.shape[0])
    mean, var, gamma, beta = (a.astype(np.float64) for a in arrays[-4:])
    scale = gamma / np.sqrt(var + node.attrs["eps"])
    if scale.shape != (weight.shape[0],) or bias.shape != scale.shape or mean.shape != scale.shape:
        return None
    dtype = weight.dtype
    new_w = (weight.astype(np.float64) * scale[:, None, None, None]).astype(dtype)
    new_b = ((bias.astype(np.float64) - mean) * scale + beta).astype(dtype)
    base = conv.inputs[1][1:]
    w_ref = add_weight(ctx.rw.weights, f"{base}.bn", new_w)
    b_ref = add_weight(ctx.rw.weights, f"{base}.bn_bias", new_b)
    return ctx.rw.add(ops.CONV2D, (conv.inputs[0], w_ref, b_ref), dict(conv.attrs.items()), name=node.name)

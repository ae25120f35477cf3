"""ATen -> slimgraph converters for contractions and neural-network layers: linear/matmul,
normalizations, convolution, pooling and scaled-dot-product attention (decomposed).
"""

from __future__ import annotations

import math

import torch

from slimgraph.compiler import ops
from slimgraph.compiler.frontends.torch_context import aten, converts
from slimgraph.compiler.types import DType


def _weight_t(ctx, w):
    """W as stored by nn.Linear ([out, in]) transposed to [in, out] (simplify pre-transposes it later)."""
    return ctx.add(ops.TRANSPOSE, [ctx.tensor(w)], {"perm": (1, 0)})


@converts(aten.linear.default)
def _linear(ctx, a):
    """linear(x, W, b) = x @ W^T + b."""
    y = ctx.add(ops.MATMUL, [ctx.tensor(a["input"]), _weight_t(ctx, a["weight"])])
    return y if a["bias"] is None else ctx.add(ops.ADD, [y, ctx.tensor(a["bias"])])


@converts(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(ctx, a):
    return ctx.add(ops.MATMUL, [ctx.tensor(a["self"]), ctx.tensor(a["mat2" if "mat2" in a else "other"])])


@converts(aten.addmm.default)
def _addmm(ctx, a):
    """addmm(b, x, W) = beta * b + alpha * (x @ W)."""
    dtype = ctx.out_type().dtype
    y = ctx.add(ops.MATMUL, [ctx.tensor(a["mat1"]), ctx.tensor(a["mat2"])])
    if a["alpha"] != 1:
        y = ctx.add(ops.MUL, [y, ctx.constant(a["alpha"], dtype)])
    bias = ctx.tensor(a["self"])
    if a["beta"] != 1:
        bias = ctx.add(ops.MUL, [bias, ctx.constant(a["beta"], dtype)])
    return ctx.add(ops.ADD, [y, bias])


# ----------------------------------------------------------------------------- normalization
def _optional(ctx, arg):
    return [] if arg is None else [ctx.tensor(arg)]


@converts(aten.layer_norm.default, aten.native_layer_norm.default)
def _layer_norm(ctx, a):
    """(x - mean) / sqrt(var + eps) * w + b over the trailing ``len(normalized_shape)`` axes."""
    inputs = [ctx.tensor(a["input"])]
    if a["weight"] is None and a["bias"] is not None:
        inputs.append(ctx.constant(1, ctx.type(inputs[0]).dtype, tuple(ctx.dim(d) for d in a["normalized_shape"])))
    inputs += _optional(ctx, a["weight"]) + _optional(ctx, a["bias"])
    out = ctx.add(ops.LAYER_NORM, inputs, {"num_axes": len(a["normalized_shape"]), "eps": a["eps"]})
    return (out, None, None) if ctx.node.target is aten.native_layer_norm.default else out


@converts(aten.rms_norm.default)
def _rms_norm(ctx, a):
    """x / sqrt(mean(x^2) + eps) * w over the last axis (eps=None: machine epsilon of the dtype)."""
    if len(a["normalized_shape"]) != 1:
        ctx.unsupported("rms_norm over more than one axis")
    x = ctx.tensor(a["input"])
    eps = a["eps"] if a["eps"] is not None else float(torch.finfo(torch.float32).eps)
    return ctx.add(ops.RMS_NORM, [x] + _optional(ctx, a["weight"]), {"eps": eps})


def _batch_norm_inputs(ctx, a):
    x = ctx.tensor(a["input"])
    t = ctx.type(x)
    channels = (t.shape[1],)
    weight = ctx.tensor(a["weight"]) if a["weight"] is not None else ctx.constant(1, t.dtype, channels)
    bias = ctx.tensor(a["bias"]) if a["bias"] is not None else ctx.constant(0, t.dtype, channels)
    return [x, ctx.tensor(a["running_mean"]), ctx.tensor(a["running_var"]), weight, bias]


@converts(aten.batch_norm.default)
def _batch_norm(ctx, a):
    if a["training"] or a["running_mean"] is None:
        ctx.unsupported("training-mode batch norm (call model.eval() before export)")
    return ctx.add(ops.BATCH_NORM, _batch_norm_inputs(ctx, a), {"eps": a["eps"]})


@converts(aten._native_batch_norm_legit_no_training.default)
def _native_batch_norm(ctx, a):
    return ctx.add(ops.BATCH_NORM, _batch_norm_inputs(ctx, a), {"eps": a["eps"]}), None, None


# ----------------------------------------------------------------------------- convolution and pooling
def _pair(value):
    value = list(value) if isinstance(value, (list, tuple)) else [value]
    return value * 2 if len(value) == 1 else value


def _conv(ctx, a, padding):
    x, w = ctx.tensor(a["input"]), ctx.tensor(a["weight"])
    if ctx.type(x).rank != 4:
        ctx.unsupported(f"convolution on rank-{ctx.type(x).rank} input (only 2-D NCHW is supported)")
    attrs = {"strides": _pair(a["stride"]), "dilation": _pair(a["dilation"]), "groups": a["groups"],
             "padding": padding}
    return ctx.add(ops.CONV2D, [x, w] + _optional(ctx, a["bias"]), attrs)


def _symmetric(padding):
    ph, pw = _pair(padding)
    return (ph, pw, ph, pw)


@converts(aten.conv2d.default)
def _conv2d(ctx, a):
    return _conv(ctx, a, _symmetric(a["padding"]))


@converts(aten.conv2d.padding)
def _conv2d_string_padding(ctx, a):
    """padding='same' pads dilation*(k-1) in total, the odd element at the end (as torch does)."""
    if a["padding"] == "valid":
        return _conv(ctx, a, (0, 0, 0, 0))
    kh, kw = ctx.type(ctx.tensor(a["weight"])).shape[2:]
    dh, dw = _pair(a["dilation"])
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return _conv(ctx, a, (th // 2, tw // 2, th - th // 2, tw - tw // 2))


@converts(aten.convolution.default)
def _convolution(ctx, a):
    if a["transposed"]:
        ctx.unsupported("transposed convolution")
    return _conv(ctx, a, _symmetric(a["padding"]))


def _pool_attrs(ctx, a):
    if a.get("ceil_mode"):
        ctx.unsupported("pooling with ceil_mode=True")
    if any(d != 1 for d in _pair(a.get("dilation", 1))):
        ctx.unsupported("dilated pooling")
    kernel = _pair(a["kernel_size"])
    return {"kernel": kernel, "strides": _pair(a["stride"]) if a["stride"] else kernel,
            "padding": _symmetric(a["padding"])}


@converts(aten.max_pool2d.default, aten.max_pool2d_with_indices.default)
def _max_pool(ctx, a):
    out = ctx.add(ops.MAX_POOL2D, [ctx.tensor(a["self"])], _pool_attrs(ctx, a))
    return (out, None) if ctx.node.target is aten.max_pool2d_with_indices.default else out


@converts(aten.avg_pool2d.default)
def _avg_pool(ctx, a):
    attrs = _pool_attrs(ctx, a)
    if a["divisor_override"] is not None or (not a["count_include_pad"] and any(attrs["padding"])):
        ctx.unsupported("avg_pool2d excluding padding or with divisor_override")
    return ctx.add(ops.AVG_POOL2D, [ctx.tensor(a["self"])], attrs)


@converts(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def _adaptive_avg_pool(ctx, a):
    """Output 1x1 is a mean over H, W; otherwise a plain average pool when H, W divide evenly."""
    x = ctx.tensor(a["self"])
    oh, ow = (ctx.dim(d) for d in _pair(a["output_size"]))
    h, w = ctx.type(x).shape[2:]
    if (oh, ow) == (1, 1):
        return ctx.add(ops.MEAN, [x], {"axes": (2, 3), "keepdims": True})
    if not all(isinstance(d, int) for d in (h, w, oh, ow)) or h % oh or w % ow:
        ctx.unsupported("adaptive pooling with uneven windows")
    kernel = (h // oh, w // ow)
    return ctx.add(ops.AVG_POOL2D, [x], {"kernel": kernel, "strides": kernel})


# ----------------------------------------------------------------------------- attention
@converts(aten.scaled_dot_product_attention.default)
def _sdpa(ctx, a):
    """softmax(q k^T * scale + mask) v, decomposed.

    * scale defaults to 1/sqrt(E); a bool mask keeps True positions (others get -inf), a float mask
      is added; ``is_causal`` keeps key j for query i when j <= i (top-left aligned, like torch).
    * grouped-query attention: each K/V head serves H/Hk consecutive query heads, so K and V are
      repeated head-wise (``[B,Hk,S,E] -> [B,Hk,r,S,E] -> [B,H,S,E]``).
    """
    if a["dropout_p"]:
        ctx.unsupported("attention dropout")
    q, k, v = (ctx.tensor(a[n]) for n in ("query", "key", "value"))
    k, v = _repeat_kv(ctx, q, k), _repeat_kv(ctx, q, v)
    qt = ctx.type(q)
    dtype, head_dim = qt.dtype, qt.shape[-1]
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(_static(ctx, head_dim))
    rank = ctx.type(k).rank
    k_t = ctx.add(ops.TRANSPOSE, [k], {"perm": list(range(rank - 2)) + [rank - 1, rank - 2]})
    scores = ctx.add(ops.MATMUL, [q, k_t])
    scores = ctx.add(ops.MUL, [scores, ctx.constant(scale, dtype)])
    if a["is_causal"]:
        scores = _apply_bool_mask(ctx, scores, _causal_mask(ctx, scores))
    if a["attn_mask"] is not None:
        mask = ctx.tensor(a["attn_mask"])
        if ctx.type(mask).dtype is DType.bool:
            scores = _apply_bool_mask(ctx, scores, mask)
        else:
            scores = ctx.add(ops.ADD, [scores, ctx.cast(mask, dtype)])
    probs = ctx.add(ops.SOFTMAX, [scores], {"axis": -1})
    return ctx.add(ops.MATMUL, [probs, v])


def _static(ctx, dim) -> int:
    if not isinstance(dim, int):
        ctx.unsupported("attention with a symbolic head size")
    return dim


def _repeat_kv(ctx, q, kv):
    heads, kv_heads = ctx.type(q).shape[-3], ctx.type(kv).shape[-3]
    if heads == kv_heads:
        return kv
    rep = _static(ctx, heads) // _static(ctx, kv_heads)
    shape = ctx.type(kv).shape
    split = shape[:-3] + (kv_heads, 1) + shape[-2:]
    y = ctx.add(ops.RESHAPE, [kv], {"shape": split})
    y = ctx.add(ops.BROADCAST_TO, [y], {"shape": shape[:-3] + (kv_heads, rep) + shape[-2:]})
    return ctx.add(ops.RESHAPE, [y], {"shape": shape[:-3] + (heads,) + shape[-2:]})


def _causal_mask(ctx, scores):
    q_len, k_len = ctx.type(scores).shape[-2:]
    rows = ctx.add(ops.RESHAPE, [ctx.add(ops.ARANGE, [], {"length": q_len})], {"shape": (q_len, 1)})
    cols = ctx.add(ops.ARANGE, [], {"length": k_len})
    return ctx.add(ops.LE, [cols, rows])


def _apply_bool_mask(ctx, scores, keep):
    neg_inf = ctx.constant(float("-inf"), ctx.type(scores).dtype)
    return ctx.add(ops.WHERE, [keep, scores, neg_inf])

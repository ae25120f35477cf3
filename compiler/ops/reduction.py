"""Reductions over axes, cumulative sums and the normalizations (softmax, layer norm, RMS norm).

Normalizations are single ops so that fusion and scheduling see them whole:
  softmax(x)_i  = exp(x_i - max x) / sum_j exp(x_j - max x)
  layer_norm(x) = (x - mean x) / sqrt(var x + eps) * w + b      (over the last `num_axes` axes)
  rms_norm(x)   = x / sqrt(mean(x^2) + eps) * w                 (over the last axis)
"""

from __future__ import annotations

import numpy as np

from slimgraph.compiler.ops.registry import AttrKind, AttrSpec, OpCategory, OpDef, register
from slimgraph.compiler.types import DType, TensorType


def _norm_axes(axes, rank):
    if axes is None or len(axes) == 0:
        return tuple(range(rank))
    out = tuple(sorted(a % rank if rank else 0 for a in axes))
    if len(set(out)) != len(out):
        raise ValueError(f"repeated reduction axes {axes}")
    return out


def _reduce_infer(result_dtype=None):
    def infer(inputs, attrs):
        x = inputs[0]
        axes = _norm_axes(attrs["axes"], x.rank)
        if attrs["keepdims"]:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return TensorType(result_dtype or x.dtype, shape)

    return infer


_REDUCE_ATTRS = (AttrSpec("axes", AttrKind.INTS, ()), AttrSpec("keepdims", AttrKind.BOOL, False))


def _reduction(name, fn, result_dtype=None):
    def ref(ins, attrs, ctx):
        x = ins[0]
        axes = _norm_axes(attrs["axes"], x.ndim)
        out = fn(x, axis=axes, keepdims=attrs["keepdims"])
        return np.asarray(out).astype(ctx.out_dtype.numpy, copy=False)

    return register(OpDef(name, OpCategory.REDUCTION, _reduce_infer(result_dtype), ref, attrs=_REDUCE_ATTRS))


SUM = _reduction("sum", np.sum)
MEAN = _reduction("mean", np.mean)
MAX = _reduction("max", np.max)
MIN = _reduction("min", np.min)
PROD = _reduction("prod", np.prod)
ANY = _reduction("any", np.any, result_dtype=DType.bool)
ALL = _reduction("all", np.all, result_dtype=DType.bool)


def _argmax_infer(inputs, attrs):
    x = inputs[0]
    axis = attrs["axis"] % x.rank
    keep = attrs["keepdims"]
    shape = tuple(1 if i == axis else d for i, d in enumerate(x.shape) if keep or i != axis)
    return TensorType(DType.i64, shape)


ARGMAX = register(OpDef(
    "argmax", OpCategory.REDUCTION, _argmax_infer,
    lambda ins, a, ctx: np.argmax(ins[0], axis=a["axis"], keepdims=a["keepdims"]).astype(np.int64),
    attrs=(AttrSpec("axis", AttrKind.INT, -1), AttrSpec("keepdims", AttrKind.BOOL, False)),
))

CUMSUM = register(OpDef(
    "cumsum", OpCategory.REDUCTION, lambda ins, a: ins[0],
    lambda ins, a, ctx: np.cumsum(ins[0], axis=a["axis"]).astype(ins[0].dtype),
    attrs=(AttrSpec("axis", AttrKind.INT, required=True),),
))


def _softmax_ref(ins, attrs, ctx):
    x = ins[0]
    shifted = x - np.max(x, axis=attrs["axis"], keepdims=True)
    e = np.exp(shifted)
    out = e / np.sum(e, axis=attrs["axis"], keepdims=True)
    return np.log(out).astype(x.dtype) if attrs["log"] else out.astype(x.dtype)


SOFTMAX = register(OpDef(
    "softmax", OpCategory.NORMALIZATION, lambda ins, a: ins[0], _softmax_ref,
    attrs=(AttrSpec("axis", AttrKind.INT, -1), AttrSpec("log", AttrKind.BOOL, False)),
))


def _layer_norm_infer(inputs, attrs):
    x = inputs[0]
    for extra in inputs[1:]:
        if extra.dtype != x.dtype:
            raise ValueError(f"layer_norm parameter dtype {extra.dtype} differs from input {x.dtype}")
    return x


def _layer_norm_ref(ins, attrs, ctx):
    x = ins[0]
    axes = tuple(range(x.ndim - attrs["num_axes"], x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + np.asarray(attrs["eps"], x.dtype))
    if len(ins) > 1:
        out = out * ins[1]
    if len(ins) > 2:
        out = out + ins[2]
    return out.astype(x.dtype)


LAYER_NORM = register(OpDef(
    "layer_norm", OpCategory.NORMALIZATION, _layer_norm_infer, _layer_norm_ref,
    attrs=(AttrSpec("num_axes", AttrKind.INT, 1), AttrSpec("eps", AttrKind.FLOAT, 1e-5)),
    arity=(1, 2, 3),
))


def _rms_norm_ref(ins, attrs, ctx):
    x = ins[0]
    ms = (x * x).mean(axis=-1, keepdims=True)
    out = x / np.sqrt(ms + np.asarray(attrs["eps"], x.dtype))
    if len(ins) > 1:
        out = out * ins[1]
    return out.astype(x.dtype)


RMS_NORM = register(OpDef(
    "rms_norm", OpCategory.NORMALIZATION, _layer_norm_infer, _rms_norm_ref,
    attrs=(AttrSpec("eps", AttrKind.FLOAT, 1e-6),), arity=(1, 2),
))

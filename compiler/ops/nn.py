"""Contractions and neural-network ops: matmul, conv2d, pooling, inference batch norm, call.

matmul follows numpy: [..., M, K] x [..., K, N] -> [..., M, N] with broadcast batch dims; a rank-1
operand is promoted (and the promoted axis dropped) as in numpy.matmul.
"""

from __future__ import annotations

import numpy as np

from slimgraph.compiler.ops.registry import AttrKind, AttrSpec, OpCategory, OpDef, register
from slimgraph.compiler.types import TensorType, broadcast_shapes, dim_add, dim_floordiv, dims_equal


def _matmul_infer(inputs, attrs):
    a, b = inputs
    if a.dtype != b.dtype:
        raise ValueError(f"matmul dtype mismatch {a.dtype} vs {b.dtype}")
    if a.rank < 1 or b.rank < 1:
        raise ValueError("matmul operands need rank >= 1")
    a_shape = a.shape if a.rank > 1 else (1,) + a.shape
    b_shape = b.shape if b.rank > 1 else b.shape + (1,)
    if not dims_equal(a_shape[-1], b_shape[-2]):
        raise ValueError(f"matmul inner dims differ: {a} x {b}")
    batch = broadcast_shapes(a_shape[:-2], b_shape[:-2])
    out = batch + ((a_shape[-2],) if a.rank > 1 else ()) + ((b_shape[-1],) if b.rank > 1 else ())
    return TensorType(attrs.get("out_dtype") or a.dtype, out)


def _matmul_ref(ins, attrs, ctx):
    out = attrs.get("out_dtype")
    if out is None:
        return np.matmul(ins[0], ins[1]).astype(ins[0].dtype)
    return np.matmul(ins[0].astype(out.numpy), ins[1].astype(out.numpy)).astype(out.numpy)


MATMUL = register(OpDef(
    "matmul", OpCategory.CONTRACTION, _matmul_infer, _matmul_ref, arity=2,
    # out_dtype: products and sums in this type (f16 operands accumulated in f32); None = the operands'
    attrs=(AttrSpec("out_dtype", AttrKind.DTYPE, None),),
))


def _conv_out(size, kernel, stride, pad_lo, pad_hi, dilation):
    effective = dilation * (kernel - 1) + 1
    return dim_add(dim_floordiv(dim_add(size, pad_lo + pad_hi - effective), stride), 1)


def _conv2d_infer(inputs, attrs):
    x, w = inputs[0], inputs[1]
    if x.rank != 4 or w.rank != 4:
        raise ValueError(f"conv2d wants NCHW input and OIHW weight, got {x} and {w}")
    groups = attrs["groups"]
    if not dims_equal(x.shape[1], w.shape[1] * groups):
        raise ValueError(f"conv2d channels: input {x} vs weight {w} with groups={groups}")
    (sh, sw), (ph0, pw0, ph1, pw1), (dh, dw) = attrs["strides"], attrs["padding"], attrs["dilation"]
    h = _conv_out(x.shape[2], w.shape[2], sh, ph0, ph1, dh)
    wd = _conv_out(x.shape[3], w.shape[3], sw, pw0, pw1, dw)
    return TensorType(x.dtype, (x.shape[0], w.shape[0], h, wd))


def _conv2d_ref(ins, attrs, ctx):
    import torch

    x, w = torch.from_numpy(np.array(ins[0])), torch.from_numpy(np.array(ins[1]))  # writable copies
    b = torch.from_numpy(np.array(ins[2])) if len(ins) > 2 else None
    ph0, pw0, ph1, pw1 = attrs["padding"]
    x = torch.nn.functional.pad(x, (pw0, pw1, ph0, ph1))
    out = torch.nn.functional.conv2d(x, w, b, attrs["strides"], 0, attrs["dilation"], attrs["groups"])
    return out.numpy()


_CONV_ATTRS = (
    AttrSpec("strides", AttrKind.INTS, (1, 1)), AttrSpec("padding", AttrKind.INTS, (0, 0, 0, 0)),
    AttrSpec("dilation", AttrKind.INTS, (1, 1)), AttrSpec("groups", AttrKind.INT, 1),
)

CONV2D = register(OpDef(
    "conv2d", OpCategory.CONTRACTION, _conv2d_infer, _conv2d_ref, attrs=_CONV_ATTRS, arity=(2, 3),
    doc="NCHW x OIHW (+ bias[O]); padding = (top, left, bottom, right)",
))


def _pool_infer(inputs, attrs):
    x = inputs[0]
    (kh, kw), (sh, sw), (ph0, pw0, ph1, pw1) = attrs["kernel"], attrs["strides"], attrs["padding"]
    h = _conv_out(x.shape[2], kh, sh, ph0, ph1, 1)
    w = _conv_out(x.shape[3], kw, sw, pw0, pw1, 1)
    return x.with_shape((x.shape[0], x.shape[1], h, w))


def _pool_ref(kind):
    def ref(ins, attrs, ctx):
        import torch

        x = torch.from_numpy(np.array(ins[0]))
        ph0, pw0, ph1, pw1 = attrs["padding"]
        fill = float("-inf") if kind == "max" else 0.0
        x = torch.nn.functional.pad(x, (pw0, pw1, ph0, ph1), value=fill)
        fn = torch.nn.functional.max_pool2d if kind == "max" else torch.nn.functional.avg_pool2d
        return fn(x, attrs["kernel"], attrs["strides"]).numpy()

    return ref


_POOL_ATTRS = (
    AttrSpec("kernel", AttrKind.INTS, required=True), AttrSpec("strides", AttrKind.INTS, (1, 1)),
    AttrSpec("padding", AttrKind.INTS, (0, 0, 0, 0)),
)
MAX_POOL2D = register(OpDef("max_pool2d", OpCategory.REDUCTION, _pool_infer, _pool_ref("max"), attrs=_POOL_ATTRS))
AVG_POOL2D = register(OpDef("avg_pool2d", OpCategory.REDUCTION, _pool_infer, _pool_ref("avg"), attrs=_POOL_ATTRS,
                            doc="padding counts as zeros in the average (count_include_pad)"))


def _batch_norm_ref(ins, attrs, ctx):
    x, mean, var, w, b = ins
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = w / np.sqrt(var + np.asarray(attrs["eps"], x.dtype))
    return (x * scale.reshape(shape) + (b - mean * scale).reshape(shape)).astype(x.dtype)


BATCH_NORM = register(OpDef(
    "batch_norm", OpCategory.NORMALIZATION, lambda ins, a: ins[0], _batch_norm_ref,
    attrs=(AttrSpec("eps", AttrKind.FLOAT, 1e-5),), arity=5,
    doc="inference batch norm over axis 1: (x - mean) / sqrt(var + eps) * w + b",
))


CALL = register(OpDef(
    "call", OpCategory.CALL, lambda ins, a: None, lambda ins, a, ctx: None,
    attrs=(AttrSpec("callee", AttrKind.STR, required=True),), arity=None,
    doc="calls another function of the module; its type is the callee's single result type",
))

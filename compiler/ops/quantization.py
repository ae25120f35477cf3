"""Quantization ops: ``dequantize`` (packed low-bit weights back to floats, inside the kernel that
uses them) and ``dynamic_quantize`` (activations rounded to 8-bit codes at run time).

``dequantize``

Inputs: ``words`` (u32 ``[P, *rest]``), ``scales`` (f16 ``[G, *rest]``) and, for asymmetric
quantization, ``zeros`` (f16 ``[G, *rest]``). Attributes: ``bits``, ``group_size`` and ``rows``
(the unpacked length of axis 0, K). With ``per_word = 32 // bits``::

    q[k, r]   = (words[k // per_word, r] >> ((k % per_word) * bits)) & (2**bits - 1)
    out[k, r] = (q[k, r] - zeros[k // group_size, r]) * scales[k // group_size, r]

(``zeros`` absent: the symmetric zero point ``2**(bits-1)``). The op is pure but not foldable:
constant folding must not replace it by the float matrix it stands for; fusion puts it in the
prologue of the matmul (or gather) that reads it, so the float weight never exists in memory.
The trailing axes ``rest`` are free, so a gather of columns (token embeddings read from a
quantized LM head) can run on the packed words first and dequantize only the rows it picked.

``dynamic_quantize``
Input ``x`` (float, last axis of length K); attributes ``bits`` (8) and ``block``. Each run of
``block`` consecutive values along the last axis gets a scale from its own largest magnitude,
computed at run time, and every value is rounded to a signed code::

    s[b]   = max_{i in b} |x[i]| / (2**(bits-1) - 1)             (127 for 8 bits)
    q[i]   = clip(rint(x[i] / s[b]), -127, 127)                  (0 where s[b] = 0)
    out[i] = q[i] * s[b]

The output is the float tensor the codes stand for, so the op means the same to every reader.
A product ``matmul(dynamic_quantize(x), dequantize(W))`` is what a CPU with 8-bit dot-product
instructions computes in integers: ``sum_k q_x[k] q_W[k, n]`` per block, one rescale per block
(``slimgraph.backends.schedules._integer_gemv``). Like ``dequantize`` it joins the matmul that
reads it as a prologue (fusion treats both as layout ops), and it is idempotent up to rounding:
the largest value of a block maps to exactly ``127 s``, so quantizing the output again gives
the same codes.
"""

from __future__ import annotations

import numpy as np

from slimgraph.compiler.ops.registry import AttrKind, AttrSpec, OpCategory, OpDef, register
from slimgraph.compiler.types import DType, TensorType, dims_equal


def unpack_words(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """uint32 words ``[P, *rest]`` -> codes ``[rows, *rest]`` (uint8), row k at word k // per_word."""
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits)).reshape((1, per_word) + (1,) * (words.ndim - 1))
    lanes = (words.astype(np.uint32)[:, None] >> shifts) & np.uint32((1 << bits) - 1)
    return lanes.reshape((-1,) + words.shape[1:])[:rows].astype(np.uint8)


def dequantize_reference(words, scales, zeros, *, bits: int, group_size: int, rows: int) -> np.ndarray:
    """The float32 tensor ``(q - z) * s`` that packed words, scales and zeros stand for."""
    codes = unpack_words(np.asarray(words), bits, rows).astype(np.float32)
    s = np.repeat(np.asarray(scales, np.float32), group_size, axis=0)[:rows]
    z = (np.float32(1 << (bits - 1)) if zeros is None
         else np.repeat(np.asarray(zeros, np.float32), group_size, axis=0)[:rows])
    return ((codes - z) * s).astype(np.float32)


def _infer(inputs, attrs):
    words, scales = inputs[0], inputs[1]
    bits, group, rows = attrs["bits"], attrs["group_size"], attrs["rows"]
    if words.dtype != DType.u32 or scales.dtype not in (DType.f16, DType.f32):
        raise ValueError(f"dequantize wants u32 words and f16/f32 scales, got {words} and {scales}")
    if not 1 <= bits <= 8 or group < 1 or not isinstance(rows, int):
        raise ValueError(f"dequantize: bad bits={bits} / group_size={group} / rows={rows}")
    if words.shape[0] != -(-rows // (32 // bits)) or scales.shape[0] != -(-rows // group):
        raise ValueError(f"dequantize: {words} / {scales} do not hold {rows} rows at {bits} bits, group {group}")
    for other in inputs[1:]:
        if other.rank != words.rank or not all(dims_equal(a, b) for a, b in zip(other.shape[1:], words.shape[1:])):
            raise ValueError(f"dequantize: trailing dims of {other} differ from the words {words}")
    return TensorType(attrs["dtype"], (rows,) + tuple(words.shape[1:]))


def _reference(ins, attrs, ctx):
    zeros = ins[2] if len(ins) > 2 else None
    out = dequantize_reference(ins[0], ins[1], zeros, bits=attrs["bits"], group_size=attrs["group_size"],
                               rows=attrs["rows"])
    return out.astype(ctx.out_dtype.numpy)


DEQUANTIZE = register(OpDef(
    "dequantize", OpCategory.LAYOUT, _infer, _reference,
    attrs=(AttrSpec("bits", AttrKind.INT, required=True), AttrSpec("group_size", AttrKind.INT, required=True),
           AttrSpec("rows", AttrKind.INT, required=True), AttrSpec("dtype", AttrKind.DTYPE, DType.f32)),
    arity=(2, 3), foldable=False,
    doc="(unpack(words) - zeros) * scales, groups of group_size rows along axis 0",
))


def dynamic_quantize_reference(x, *, bits: int, block: int) -> np.ndarray:
    """``x`` rounded to ``bits``-bit codes with one scale per ``block`` values of the last axis."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block))
    limit = np.float32((1 << (bits - 1)) - 1)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / limit
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.clip(np.rint(blocks / safe), -limit, limit)
    return (codes * scale).astype(np.float32).reshape(x.shape)


def _infer_dynamic(inputs, attrs):
    x = inputs[0]
    bits, block = attrs["bits"], attrs["block"]
    if x.dtype not in (DType.f32, DType.f16) or x.rank < 1:
        raise ValueError(f"dynamic_quantize wants a float tensor, got {x}")
    if bits != 8 or block < 1:
        raise ValueError(f"dynamic_quantize: bits must be 8 and block positive, got bits={bits}, block={block}")
    last = x.shape[-1]
    if not isinstance(last, int) or last % block:
        raise ValueError(f"dynamic_quantize: the last axis of {x} is not a whole number of blocks of {block}")
    return x


def _reference_dynamic(ins, attrs, ctx):
    out = dynamic_quantize_reference(ins[0], bits=attrs["bits"], block=attrs["block"])
    return out.astype(ctx.out_dtype.numpy)


DYNAMIC_QUANTIZE = register(OpDef(
    "dynamic_quantize", OpCategory.LAYOUT, _infer_dynamic, _reference_dynamic,
    attrs=(AttrSpec("bits", AttrKind.INT, 8), AttrSpec("block", AttrKind.INT, required=True)),
    doc="x rounded to signed codes, one run-time scale per block of the last axis (max |x| / 127)",
))

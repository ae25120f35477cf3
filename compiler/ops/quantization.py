"""``dequantize``: a packed low-bit weight turned back into floats, inside the kernel that uses it.

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

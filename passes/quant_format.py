"""The storage format of quantized weight matrices, shared by every quantizer and by the
``dequantize`` op's reference.

A linear layer's weight ``W`` is stored as slimgraph's IR uses it: shape ``[K, N]`` with K the
reduction (input) axis, so ``y = x @ W``. Quantization is *group-wise along K*: each run of
``group_size`` consecutive rows shares, per output column n, a scale ``s`` and a zero point ``z``::

    W_hat[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]        q in [0, 2**bits)

* per-channel quantization is the special case ``group_size == K``;
* symmetric quantization fixes ``z = 2**(bits-1)`` (nothing stored); asymmetric (affine) stores z
  (an integer, kept in the scale dtype) -- or, with ``float_zero``, the float ``-min / s`` of each
  group, so that its grid starts at the group's own minimum (llama.cpp's Q4_1 stores that minimum);
* scales and zeros are stored as float16 (``[K/g, N]``); quantizers round a scale to float16
  *before* computing codes, so stored codes and stored scales agree exactly.

Codes are packed into uint32 words along K: ``per_word = 32 // bits`` codes per word (8 for int4,
10 for 3 bits, 4 for int8); row k lives in word ``k // per_word`` at bit ``(k % per_word) * bits``.
K is padded with zero codes to a multiple of per_word. The packed array has shape
``[ceil(K / per_word), N]``: at run time the kernel streams these words and the scales, never a
float copy of W.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCALE_DTYPE = np.float16
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


def codes_per_word(bits: int) -> int:
    return 32 // bits


def packed_rows(rows: int, bits: int) -> int:
    return -(-rows // codes_per_word(bits))


@dataclass(frozen=True)
class QuantSpec:
    """How one matrix is quantized. ``group_size=None`` means per output channel (one group = K)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    float_zero: bool = False        # asymmetric with a float zero point (each group's grid starts at its minimum)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group size must be positive, got {self.group_size}")
        if self.float_zero and self.symmetric:
            raise ValueError("a float zero point needs asymmetric quantization")

    def group_for(self, rows: int) -> int:
        """The group length for a matrix with ``rows`` rows along K."""
        return rows if self.group_size is None else self.group_size

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def symmetric_zero(self) -> int:
        return 1 << (self.bits - 1)

    def label(self) -> str:
        group = "channel" if self.group_size is None else f"g{self.group_size}"
        kind = "sym" if self.symmetric else ("asym-float-zero" if self.float_zero else "asym")
        return f"int{self.bits}-{group}-{kind}"


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``[K, N]`` (values in [0, 2**bits)) into uint32 words ``[ceil(K/pw), N]``."""
    per_word = codes_per_word(bits)
    rows, cols = codes.shape
    padded = np.zeros((packed_rows(rows, bits) * per_word, cols), np.uint32)
    padded[:rows] = codes.astype(np.uint32)
    lanes = padded.reshape(-1, per_word, cols)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, :, None]
    return np.bitwise_or.reduce(lanes << shifts, axis=1).astype(np.uint32)


def unpack_codes(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint32 words -> codes ``[rows, N]`` as uint8."""
    per_word = codes_per_word(bits)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, :, None]
    lanes = (words.astype(np.uint32)[:, None, :] >> shifts) & np.uint32((1 << bits) - 1)
    return lanes.reshape(-1, words.shape[-1])[:rows].astype(np.uint8)


def dequantize_codes(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, *, bits: int,
                     group_size: int) -> np.ndarray:
    """``(q - z) * s`` in float32 for unpacked codes ``[K, N]``; ``zeros=None`` is symmetric."""
    s = np.repeat(scales.astype(np.float32), group_size, axis=0)[: codes.shape[0]]
    z = (np.float32(1 << (bits - 1)) if zeros is None
         else np.repeat(zeros.astype(np.float32), group_size, axis=0)[: codes.shape[0]])
    return ((codes.astype(np.float32) - z) * s).astype(np.float32)


def dequantize_packed(words: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, *, bits: int,
                      group_size: int, rows: int) -> np.ndarray:
    """The float32 matrix ``[rows, N]`` that packed words, scales and zeros stand for."""
    return dequantize_codes(unpack_codes(words, bits, rows), scales, zeros, bits=bits, group_size=group_size)


@dataclass(frozen=True)
class QuantizedMatrix:
    """A quantized ``[K, N]`` matrix: unpacked codes (uint8), float16 scales/zeros ``[K/g, N]``."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    spec: QuantSpec

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def group_size(self) -> int:
        return self.spec.group_for(self.rows)

    def dequantize(self) -> np.ndarray:
        return dequantize_codes(self.codes, self.scales, self.zeros, bits=self.spec.bits,
                                group_size=self.group_size)

    def packed(self) -> np.ndarray:
        return pack_codes(self.codes, self.spec.bits)

    @property
    def storage_bytes(self) -> int:
        """Bytes of the packed words, scales and zeros."""
        zeros = 0 if self.zeros is None else self.zeros.nbytes
        return packed_rows(self.rows, self.spec.bits) * self.codes.shape[1] * 4 + self.scales.nbytes + zeros

"""One-row products of 8-bit activation codes and packed 4/8-bit weight codes, in integers (x86 VNNI).

A decoding step's ``matmul(dynamic_quantize(x), dequantize(words, scales, zeros))`` has one row x
of K values, quantized per block of ``B`` values (scale ``t[b]``, signed codes ``a[k]`` in
[-127, 127], see the ``dynamic_quantize`` op) and weights ``W[k, n] = (q[k, n] - z[g, n]) s[g, n]``
per group g of G rows. Inside a sub-chunk c of ``S = gcd(K, G, B)`` rows t, s and z are constant::

    y[n] = sum_c t[c] s[c, n] (D[c, n] - z[c, n] A[c]),   D[c, n] = sum_{k in c} a[k] q[k, n],
                                                           A[c]    = sum_{k in c} a[k]

D is an exact int32 dot product of unsigned weight codes and signed activation codes, which
AVX-512 VNNI computes 64 products at a time: ``vpdpbusd`` adds, to each of 16 int32 lanes, the
dot product of 4 unsigned bytes with 4 signed bytes.

Weight codes are packed along K in uint32 words (``P = 32 / bits`` codes per word), so 16
consecutive words of one word row hold 16 columns x P codes. Byte j of a word holds the codes of
rows ``p = j H + h`` (``H = 8 / bits`` codes per byte, h the nibble): masking the word with
0x0F0F0F0F (h = 0), or shifting it right by 4 first (h = 1), leaves per column four unsigned bytes,
the codes of rows {h, H + h, 2H + h, 3H + h} -- one ``vpdpbusd`` operand. Activation codes are
stored in the matching order, ``xa[w, h, j] = a[w P + j H + h]``, so the four bytes of (w, h) are one
int32 broadcast to the 16 columns. Per word vector that is one load, a mask (and a shift) and one
``vpdpbusd`` per h: 8 rows x 16 columns in 4-6 instructions, where the float kernel
(``_quantized_gemv``) spends a mask, a conversion and a multiply-add per weight.

Blocks of the kernel: ``block_max`` (max |x| per block), ``activation_codes`` (xa, int8),
``code_sums`` (A), ``part`` (D, int32, role "partial") and the output ``y`` (role "output") with the
fused epilogue. ``_quantized_gemv.schedule`` schedules it; ``tensorize_partial`` replaces the
partial's 16-column x H x 4 inner loops by the tensor intrinsic of the weight width.
"""

from __future__ import annotations

import math

from tvm import te, tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

DYNAMIC_QUANTIZE_ATTR = "slimgraph.dynamic_quantize"  # {"bits", "block"} on the dynamic_quantize PrimFunc
INTEGER_DOT = "slimgraph.integer_dot"   # on the partial block: the tensor intrinsic of its inner loops
TARGET_FEATURE = "avx512vnni"           # LLVM feature of the targets that get these kernels
LANES = 16                              # int32 lanes of one vpdpbusd
CODE_LIMIT = 127.0                      # largest activation code (8 bits, symmetric)
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
_NIBBLES = 0x0F0F0F0F


def code_times_activation(word, activation, bits: int, h, j):
    """``int32(code) * int32(activation)`` for the code at byte j, position h of a packed word."""
    shift = tirx.Cast("uint32", h * bits + j * 8)
    code = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const((1 << bits) - 1, "uint32"))
    return tirx.Cast("int32", code) * tirx.Cast("int32", activation)


def _description(bits: int):
    """What the intrinsic computes: 16 columns += the dot products of one word row's codes (loops
    over the 16 columns, the H codes of a byte where H > 1, and the 4 bytes of a word)."""
    halves = 8 // bits

    @T.prim_func(s_tir=True)
    def nibbles(words: T.Buffer((LANES,), "uint32", offset_factor=1),
                codes: T.Buffer((halves, 4), "int8", offset_factor=1),
                acc: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(acc[0:LANES], words[0:LANES], codes[0:halves, 0:4])
            T.writes(acc[0:LANES])
            for n, h, j in T.grid(LANES, halves, 4):
                with T.sblock("update"):
                    vn, vh, vj = T.axis.remap("SRR", [n, h, j])
                    acc[vn] = acc[vn] + code_times_activation(words[vn], codes[vh, vj], bits, vh, vj)

    @T.prim_func(s_tir=True)
    def whole_bytes(words: T.Buffer((LANES,), "uint32", offset_factor=1),
                    codes: T.Buffer((1, 4), "int8", offset_factor=1),
                    acc: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(acc[0:LANES], words[0:LANES], codes[0:1, 0:4])
            T.writes(acc[0:LANES])
            for n, j in T.grid(LANES, 4):
                with T.sblock("update"):
                    vn, vj = T.axis.remap("SR", [n, j])
                    acc[vn] = acc[vn] + code_times_activation(words[vn], codes[0, vj], bits, 0, vj)

    return nibbles if halves > 1 else whole_bytes


def _dot(acc, weight_bytes, codes, h):
    """``vpdpbusd(acc, weight bytes, the four activation codes of position h broadcast)``."""
    broadcast = T.reinterpret("int8x64", T.broadcast(T.reinterpret("int32", codes.vload([h, 0], "int8x4")), LANES))
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_VPDPBUSD), acc, weight_bytes, broadcast,
                                   dtype="int32x16")


@T.prim_func(s_tir=True)
def _vnni_int4(words: T.Buffer((LANES,), "uint32", offset_factor=1),
               codes: T.Buffer((2, 4), "int8", offset_factor=1),
               acc: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")):
    with T.sblock("root"):
        T.reads(acc[0:LANES], words[0:LANES], codes[0:2, 0:4])
        T.writes(acc[0:LANES])
        packed = T.reinterpret("int32x16", words.vload([0], "uint32x16"))
        low = T.reinterpret("int8x64", T.bitwise_and(packed, T.broadcast(_NIBBLES, LANES)))
        high = T.reinterpret("int8x64", T.bitwise_and(T.shift_right(packed, T.broadcast(4, LANES)),
                                                      T.broadcast(_NIBBLES, LANES)))
        acc[T.ramp(0, 1, LANES)] = _dot(_dot(acc.vload([0], "int32x16"), low, codes, 0), high, codes, 1)


@T.prim_func(s_tir=True)
def _vnni_int8(words: T.Buffer((LANES,), "uint32", offset_factor=1),
               codes: T.Buffer((1, 4), "int8", offset_factor=1),
               acc: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")):
    with T.sblock("root"):
        T.reads(acc[0:LANES], words[0:LANES], codes[0:1, 0:4])
        T.writes(acc[0:LANES])
        weight_bytes = T.reinterpret("int8x64", words.vload([0], "uint32x16"))
        acc[T.ramp(0, 1, LANES)] = _dot(acc.vload([0], "int32x16"), weight_bytes, codes, 0)


INTRINSICS = {bits: f"slimgraph_vnni_u{bits}s8_16lanes" for bits in (4, 8)}
for _bits, _impl in ((4, _vnni_int4), (8, _vnni_int8)):
    TensorIntrin.register(INTRINSICS[_bits], _description(_bits), _impl, override=True)


def activation_code(value, peak):
    """The signed code of a float32 ``value`` in a block whose largest magnitude is ``peak``
    (``dynamic_quantize``: scale ``peak / 127``, round to nearest, clip; 0 where the block is 0)."""
    scale = peak / CODE_LIMIT
    rounded = tirx.nearbyint(value / tirx.Select(scale > 0, scale, tirx.const(1.0, "float32")))
    return tirx.max(tirx.min(rounded, CODE_LIMIT), -CODE_LIMIT)


def sub_chunk(rows: int, group: int, block: int) -> int:
    """Rows over which the activation scale, the weight scale and the zero point are all constant."""
    return math.gcd(math.gcd(rows, group), block)


def supports(bits: int, group: int, rows: int, columns: int, block: int) -> bool:
    """Whether the integer kernel computes this product (else the float kernel does)."""
    per_word = 32 // bits
    return (bits in INTRINSICS and columns % LANES == 0 and rows % block == 0
            and sub_chunk(rows, group, block) % per_word == 0)


def integer_product(x, words, scales, *zeros, bits: int, group: int, rows: int, block: int):
    """The TE compute of ``matmul(dynamic_quantize(x), dequantize(words, scales, zeros))`` for one row."""
    from ._quantized_gemv import CODES_PER_WORD, ROLE, zero_point

    per_word, halves, columns = 32 // bits, 8 // bits, words.shape[-1]
    sub = sub_chunk(rows, group, block)
    word_rows = sub // per_word
    lead = (0,) * (len(x.shape) - 1)
    i = te.reduce_axis((0, block), "i")
    peak = te.compute((rows // block,), lambda b: te.max(tirx.abs(x[lead + (b * block + i,)]), axis=i),
                      name="block_max", attrs={ROLE: "activation"})

    def code(k):
        return activation_code(x[lead + (k,)], peak[tirx.floordiv(k, block)])

    codes = te.compute((rows // per_word, halves, 4), lambda w, h, j: code(w * per_word + j * halves + h).astype("int8"),
                       name="activation_codes", attrs={ROLE: "activation"})
    s = te.reduce_axis((0, sub), "s")
    sums = te.compute((rows // sub,), lambda c: te.sum(code(c * sub + s), axis=s), name="code_sums",
                      attrs={ROLE: "activation"})
    w, j = te.reduce_axis((0, word_rows), "w"), te.reduce_axis((0, 4), "j")
    h = te.reduce_axis((0, halves), "h") if halves > 1 else 0
    axes = [w, h, j] if halves > 1 else [w, j]
    part = te.compute((rows // sub, columns), lambda c, n: te.sum(code_times_activation(
        words[c * word_rows + w, n], codes[c * word_rows + w, h, j], bits, h, j), axis=axes),
        name="part", attrs={ROLE: "partial", CODES_PER_WORD: per_word, INTEGER_DOT: INTRINSICS[bits]})
    c = te.reduce_axis((0, rows // sub), "c")

    def out(*idx):
        g, n = tirx.floordiv(c * sub, group), idx[-1]
        scale = scales[g, n].astype("float32") * (peak[tirx.floordiv(c * sub, block)] / CODE_LIMIT)
        return te.sum(scale * (part[c, n].astype("float32") - zero_point(zeros, (g, n), bits) * sums[c]), axis=c)

    return te.compute(tuple(x.shape[:-1]) + (columns,), out, name="matmul", attrs={ROLE: "output"})


def tensorize_partial(sch: Schedule, part) -> tuple:
    """Order the partial's loops (computed at one chunk of one column tile) as words, 16-column
    vectors, then the intrinsic's (16 columns, H, 4); returns (word loop, a callback that
    tensorizes once the reduction was split into init and update blocks)."""
    intrinsic = str(sch.get(part).annotations[INTEGER_DOT])
    inner = len(sch.get(part).iter_vars) - 3          # (h,) j: the loops within one word
    column, word, *within = sch.get_loops(part)[-2 - inner:]
    vectors, lane = sch.split(column, [None, LANES])
    sch.reorder(word, vectors, lane, *within)

    def tensorize():
        sch.tensorize(lane, intrinsic)
        sch.unroll(word)
        sch.unroll(vectors)

    return word, tensorize

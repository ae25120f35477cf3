"""CUDA one-token products over transposed low-bit words, with the group scale factored out.

A decoding step multiplies one row ``x[K]`` by weights stored as ``b``-bit codes ``q`` packed
``P = 32 / b`` to a uint32 word (``pack_weights`` stores them transposed, ``Wq[N, K / P]``), with a
scale ``s`` and zero point ``z`` per group of ``G`` rows and output:
``W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]``. Written as ``matmul(x, dequantize(..))`` every weight
costs a shift, a mask, an or, a float subtraction (the code made a float through its bits, see
``gpu_dequantize``), a multiply-add with ``s`` and ``z s``, and the multiply-add with ``x``: some
seven instructions for half a byte of memory, more than an H100 issues at its memory bandwidth.

Within one word ``w`` (rows ``P w .. P w + P - 1``, one group) the scale and the zero point are
constant, so

    y[n] = sum_w s[g(w), n] * (sum_{i < P} x[P w + i] q_i(w, n)  -  z[g(w), n] * xs[w]),
    xs[w] = sum_{i < P} x[P w + i],

and the inner sum needs the codes only. The code's shift is folded into ``x``: the codes of one
16-bit half ``h`` of a word sit at bit ``b r`` (``i = h R + r``, ``R = 16 / b``), and masking the half
in place gives ``q 2^(b r)``, under ``2^16``, so or-ing it into the float ``2^23`` and subtracting
``2^23`` gives ``q 2^(b r)`` exactly; with ``xq[k] = x[k] 2^(-b (k mod R))`` (a power of two: exact),

    x[P w + i] q_i(w, n) = xq[P w + i] * (float(((word >> 16 h) & (2^b - 1) << b r) | 0x4B000000) - 2^23).

Per weight that leaves an and-or (one ``LOP3``), a float subtraction and a multiply-add; per word
one shift (the high half) and two multiply-adds. Blocks of the kernel:

* ``xq[k]`` and ``xs[w]`` (K and K / P values, annotated ``ROW_STAGE``: ``RowGEMV`` computes them once
  per thread block into shared memory);
* ``y[n] = sum_w ...`` as above (one reduction over the words), then the fused epilogue.

``factor_row_products_pass`` (CUDA lowering with ``factored_rows``, before ops are legalized) puts
this kernel in place of a one-row ``matmul(x, dequantize(words, scales, zeros))`` in float32 whose
words are stored transposed (read through ``permute_dims`` and ``reshape``) with whole 32-word lane
steps.

**Measured slower, so builds keep the dequantize form** (H100, ``bench/results/
stage3-cuda-2026-12-08-run3-factored``): every thread block computes ``xq`` and ``xs`` for the whole
row before its first multiply-add, and that prologue costs more than the arithmetic it saves. The
LM head [2048 -> 32000] took 66.9, 41.7 and 30.2 us with 2, 4 and 8 warps a block against 25.7 us
for ``RowGEMV`` over the dequantize form; fitted to the block count (16000, 8000, 4000), about
18.6 us plus 2.9 ns a block: the main loop is faster, the per-block stages are what lose. A factored
kernel reading ``xq`` and ``xs`` made once, by the kernel that produces ``x``, would keep the gain;
the pass stays for the benchmarks until then.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx

from slimgraph.backends.relax_ops import FLOAT_MAGIC, FLOAT_MAGIC_BITS
from slimgraph.backends.schedules._quantized_gemv import dequantized_weight, one_row, rewrite_primitives, zero_point

ROW_STAGE = "slimgraph.row_stage"   # block annotation of the per-block activation stages: "codes" / "sums"
HALF_BITS = 16                      # codes are unpacked from one 16-bit half of a word at a time
LANES = 32                          # the products factored here have whole warp steps of chunks
CHUNK_WORDS = (2, 1)                # words of one reduction step (a lane's load), widest first
STAGE_BYTES = 48 * 1024             # static shared memory of a CUDA thread block: xq and xs must fit


def chunk_words(rows: int, group: int, bits: int) -> int | None:
    """Words ``V`` of a chunk (one lane's 8-byte load, else 4-byte), None where no chunk fits: the
    codes of a chunk share a group, the chunks of a row fill whole warp steps, and the staged
    float32 ``xq`` and ``xs`` fit a thread block's shared memory."""
    per_word = 32 // bits
    return next((v for v in CHUNK_WORDS if group % (v * per_word) == 0 and rows % (v * per_word * LANES) == 0
                 and 4 * (rows + rows // (v * per_word)) <= STAGE_BYTES), None)


def factored_row_product(x, words, scales, *zeros, bits: int, group: int, words_per_chunk: int):
    """TE tensor ``y[.., n]`` of the factored product (see the module doc): ``x [1, .., K]`` float32,
    ``words [K / P, N]``, ``scales`` / ``zeros`` ``[K / G, N]``; one reduction step a chunk of
    ``words_per_chunk`` words."""
    per_word, per_half = 32 // bits, HALF_BITS // bits
    chunk = words_per_chunk * per_word   # codes of a chunk
    rows, columns = int(x.shape[-1]), words.shape[-1]
    lead = (0,) * (len(x.shape) - 1)
    xq = te.compute((rows,), lambda k: x[lead + (k,)] * tirx.exp2(tirx.Cast("float32", tirx.floormod(k, per_half) * -bits)),
                    name="xq", attrs={ROW_STAGE: "codes"})
    xs = te.compute((rows // chunk,), lambda c: sum(x[lead + (c * chunk + e,)] for e in range(chunk)),
                    name="xs", attrs={ROW_STAGE: "sums"})
    c = te.reduce_axis((0, rows // chunk), "c")

    def code_in_place(word, i: int):
        """``q_i 2^(b r)`` of word ``word``: its half masked in place, made a float through its bits."""
        half = word if i < per_half else tirx.shift_right(word, tirx.const(HALF_BITS, "uint32"))
        mask = tirx.const(((1 << bits) - 1) << (bits * (i % per_half)), "uint32")
        biased = tirx.bitwise_or(tirx.bitwise_and(half, mask), tirx.const(FLOAT_MAGIC_BITS, "uint32"))
        return tirx.reinterpret("float32", biased) - tirx.const(FLOAT_MAGIC, "float32")

    def out(*idx):
        n, g = idx[-1], tirx.floordiv(c * chunk, group)
        codes = sum(xq[c * chunk + v * per_word + i] * code_in_place(words[c * words_per_chunk + v, n], i)
                    for v in range(words_per_chunk) for i in range(per_word))
        return te.sum(scales[g, n].astype("float32") * (codes - zero_point(zeros, (g, n), bits) * xs[c]), axis=c)

    return te.compute(tuple(x.shape[:-1]) + (columns,), out, name="matmul")


def _transposed_words(rewriter, words) -> bool:
    """Whether ``words`` is ``reshape(permute_dims(stored, [1, 0, ..]))``: words stored ``[N, K / P, ..]``."""
    reshape = rewriter.lookup_binding(words) if isinstance(words, relax.Var) else None
    if not isinstance(reshape, relax.Call) or reshape.op != tvm.ir.Op.get("relax.reshape"):
        return False
    permute = rewriter.lookup_binding(reshape.args[0]) if isinstance(reshape.args[0], relax.Var) else None
    if not isinstance(permute, relax.Call) or permute.op != tvm.ir.Op.get("relax.permute_dims"):
        return False
    axes = permute.attrs.axes
    return axes is not None and [int(a) for a in axes][:2] == [1, 0]


def factorable_product(rewriter, call, *, float16_activation: bool = False):
    """``(fields, bits, group, words_per_chunk)`` of a one-row ``matmul(x, dequantize(fields))`` in
    float32 over transposed words with whole chunks, else None. ``rewriter`` looks up bindings
    (``lookup_binding``, ``mod_``); ``float16_activation`` also takes the float16 form that
    ``weights_in_float32_pass`` turns into float32 (float16 x and weights, float32 sums)."""
    if call.op != tvm.ir.Op.get("relax.matmul") or str(call.attrs.out_dtype) not in ("void", "float32"):
        return None
    dtype = call.args[0].ty.dtype if float16_activation else "float32"
    if dtype not in ("float32", "float16") or not one_row(call.args[0].ty, dtype) or call.args[1].ty.dtype != dtype:
        return None
    if dtype == "float16" and str(call.attrs.out_dtype) != "float32":   # weights_in_float32 leaves it alone
        return None
    weight = dequantized_weight(rewriter, call.args[1])
    if weight is None:
        return None
    fields, bits, group = weight
    rows = int(call.args[1].ty.shape.values[0])
    words_per_chunk = chunk_words(rows, group, bits) if HALF_BITS % bits == 0 else None
    if words_per_chunk is None or not _transposed_words(rewriter, fields[0]):
        return None
    return fields, bits, group, words_per_chunk


@relax.expr_functor.mutator
class _RowFactorer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod

    def visit_call_(self, call):
        found = factorable_product(self, call)
        if found is None:
            return super().visit_call_(call)
        fields, bits, group, words_per_chunk = found
        return self.builder_.call_te(factored_row_product, call.args[0], *fields, bits=bits, group=group,
                                     words_per_chunk=words_per_chunk, primfunc_name_hint="factored_row_gemv")


def factor_row_products_pass() -> tvm.transform.Pass:
    """One-row float32 ``matmul(x, dequantize(..))`` over transposed words -> the factored kernel."""

    @tvm.transform.module_pass(opt_level=0, name="SlimgraphFactorRowProducts")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_primitives(mod, _RowFactorer(mod))

    return _pass

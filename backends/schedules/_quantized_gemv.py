"""One-row products over packed low-bit weights for CPUs, with the group scale factored out.

A decoding step multiplies one row ``x[K]`` by weights stored as ``bits``-bit codes ``q`` packed
``P = 32 / bits`` to a uint32 word, with a scale ``s`` and zero point ``z`` per group of ``G`` rows
and column: ``W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]``. Dequantizing every weight costs a
shift, a mask, a conversion, a subtraction and a multiplication before the multiply-add. Within
a chunk of ``C = gcd(K, G)`` rows the scale and zero point are constant, so

    y[n] = sum_c s[c, n] * (sum_{k in c} x[k] q[k, n]  -  z[c, n] * sum_{k in c} x[k])

and the inner sum needs the code only. The code's shift is folded into ``x`` as well: with
``j = k mod P`` the masked word ``word & (2^bits - 1) << bits j`` equals ``q * 2^(bits j)`` exactly
(at most ``bits`` significant bits), so ``x[k] q[k, n] = (x[k] 2^(-bits j)) * float(word & mask_j)``.
Per weight that leaves a mask, a conversion and a multiply-add; per chunk and column a
multiply-add more. Blocks of the kernel:

* ``xq[k] = x[k] * 2^(-bits (k mod P))`` and ``xs[c] = sum_{k in c} x[k]`` (K and K/C values);
* ``part[c, n] = sum_{k in c} xq[k] * float(word(k, n) & mask(k mod P))``;
* ``y[n] = sum_c s[c, n] * (part[c, n] - z[c, n] * xs[c])``, then the fused epilogue.

``factor_quantized_gemv`` (a Relax pass of the CPU pipeline, before ops are legalized) puts this
kernel in place of ``matmul(x, dequantize(words, scales, zeros))`` when x has one row -- or, on a
CPU with 8-bit dot products and x from ``dynamic_quantize``, the integer kernel of
``_integer_gemv``;
``schedule`` tiles it: parallel over tiles of columns (and parts of the chunks where the tiles are
too few), ``part`` kept in vector registers for one chunk at a time, the k steps of a chunk
unrolled by P (constant masks, one word load for P steps).
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te, tirx
from tvm.s_tir import Schedule

from . import _integer_gemv, _prefetch, _prologue
from ._analysis import root_blocks
from ._gemv import TILE_VECTORS, column_tile, full_tile_parts, place_epilogue

DEQUANTIZE_ATTR = "slimgraph.dequantize"  # {"bits", "group_size"} on the dequantize PrimFunc
ROLE = "slimgraph.quantized_gemv"  # block annotation: "partial" / "output"
CODES_PER_WORD = "slimgraph.codes_per_word"  # on the partial block
PREFETCH_TASKS_AHEAD = 1  # tasks ahead whose words the kernels prefetch (0: none; see _prefetch)


def zero_point(zeros: tuple, index: tuple, bits: int):
    """The float zero point at ``index``: the stored one, or ``2^(bits-1)`` for symmetric codes."""
    return zeros[0][index].astype("float32") if zeros else tirx.const(float(1 << (bits - 1)), "float32")


def _factored_product(x, words, scales, *zeros, bits: int, group: int, rows: int):
    """The TE compute of the factored product (shapes as ``matmul(x, dequantize(...))``)."""
    per_word, columns = 32 // bits, words.shape[-1]
    chunk = math.gcd(rows, group)
    lead = (0,) * (len(x.shape) - 1)
    xq = te.compute((rows,), lambda k: x[lead + (k,)] * tirx.exp2(
        tirx.Cast("float32", tirx.floormod(k, per_word) * -bits)), name="xq", attrs={ROLE: "activation"})
    i = te.reduce_axis((0, chunk), "i")
    xs = te.compute((rows // chunk,), lambda c: te.sum(x[lead + (c * chunk + i,)], axis=i), name="xs",
                    attrs={ROLE: "activation"})

    def code(k, n):
        mask = tirx.shift_left(tirx.const((1 << bits) - 1, "uint32"), tirx.Cast("uint32", tirx.floormod(k, per_word) * bits))
        return tirx.bitwise_and(words[tirx.floordiv(k, per_word), n], mask).astype("float32")

    j = te.reduce_axis((0, chunk), "j")
    part = te.compute((rows // chunk, columns), lambda c, n: te.sum(xq[c * chunk + j] * code(c * chunk + j, n), axis=j),
                      name="part", attrs={ROLE: "partial", CODES_PER_WORD: per_word})
    c = te.reduce_axis((0, rows // chunk), "c")

    def out(*idx):
        g = tirx.floordiv(c * chunk, group)
        return te.sum(scales[g, idx[-1]].astype("float32") * (part[c, idx[-1]] - zero_point(zeros, (g, idx[-1]), bits) * xs[c]), axis=c)

    return te.compute(tuple(x.shape[:-1]) + (columns,), out, name="matmul", attrs={ROLE: "output"})


def one_row(ty, dtype: str = "float32") -> bool:
    """A ``dtype`` tensor of static shape (1, .., 1, K)."""
    shape = getattr(ty, "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or ty.dtype != dtype:
        return False
    dims = [d.value if isinstance(d, tirx.IntImm) else None for d in shape.values[:-1]]
    return all(d == 1 for d in dims)


def is_primitive(func) -> bool:
    """A Relax function that ``FuseTIR`` makes one kernel (slimgraph's fused functions)."""
    return isinstance(func, relax.Function) and func.attrs is not None and bool(func.attrs.get("Primitive", False))


def rewrite_primitives(mod: tvm.IRModule, rewriter: relax.PyExprMutator) -> tvm.IRModule:
    """``mod`` with every Primitive function visited by ``rewriter`` (built on ``mod``), the bindings
    it leaves unused removed."""
    for gvar, func in list(mod.functions_items()):
        if is_primitive(func):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())


def dequantized_weight(rewriter, value):
    """``(fields, bits, group)`` of the dequantize producing ``value`` (its words, scales and zero
    points, its bits and group size), else None."""
    found = producer_spec(rewriter, value, DEQUANTIZE_ATTR)
    if found is None:
        return None
    return found[0].args[1].fields, int(found[1]["bits"]), int(found[1]["group_size"])


def producer_spec(factorer, value, attr: str):
    """(the call_tir producing ``value``, its PrimFunc's ``attr``) -- or None when another op made it."""
    producer = factorer.lookup_binding(value) if isinstance(value, relax.Var) else None
    if not isinstance(producer, relax.Call) or producer.op != tvm.ir.Op.get("relax.call_tir"):
        return None
    attrs = factorer.mod_[producer.args[0]].attrs
    spec = attrs.get(attr) if attrs is not None else None
    return None if spec is None else (producer, spec)


@relax.expr_functor.mutator
class _Factorer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, integer_dot: bool):
        super().__init__(mod)
        self.mod_ = mod
        self.integer_dot = integer_dot

    def visit_call_(self, call):
        factored = self._factored(call)
        return factored if factored is not None else super().visit_call_(call)

    def _factored(self, call):
        if call.op != tvm.ir.Op.get("relax.matmul") or not one_row(call.args[0].ty):
            return None
        weight = dequantized_weight(self, call.args[1])
        if weight is None:
            return None
        fields, bits, group = weight
        rows, columns = (int(d) for d in call.args[1].ty.shape.values)
        quantized = producer_spec(self, call.args[0], _integer_gemv.DYNAMIC_QUANTIZE_ATTR) if self.integer_dot else None
        if quantized is not None and _integer_gemv.supports(bits, group, rows, columns, int(quantized[1]["block"])):
            return self.builder_.call_te(_integer_gemv.integer_product, quantized[0].args[1].fields[0], *fields,
                                         bits=bits, group=group, rows=rows, block=int(quantized[1]["block"]),
                                         primfunc_name_hint="integer_gemv")
        return self.builder_.call_te(_factored_product, call.args[0], *fields, bits=bits, group=group, rows=rows,
                                     primfunc_name_hint="quantized_gemv")


def factor_quantized_gemv(integer_dot: bool) -> tvm.transform.Pass:
    """One-row ``matmul(x, dequantize(..))`` of fused functions -> the factored kernel; with
    ``integer_dot`` (the target has 8-bit dot products), ``matmul(dynamic_quantize(x), ..)`` -> the
    integer kernel where it applies."""

    @tvm.transform.module_pass(opt_level=0, name="SlimgraphFactorQuantizedGEMV")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_primitives(mod, _Factorer(mod, integer_dot))

    return _pass


def _role(sch: Schedule, block) -> str | None:
    value = sch.get(block).annotations.get(ROLE)
    return str(value) if value is not None else None


def chunk_splits(columns: int, chunks: int, lanes: int, cores: int) -> int:
    """Parts the chunks are split into: the smallest divisor of ``chunks`` that reaches
    ``full_tile_parts`` (all the chunks where none does); 1 where the columns are not whole tiles
    (the tiles are narrowed instead)."""
    needed = full_tile_parts(columns, lanes, cores)
    return next((d for d in range(1, chunks + 1) if chunks % d == 0 and d >= needed), chunks)


def schedule(sch: Schedule, lanes: int, cores: int) -> tirx.PrimFunc | None:
    """Schedule a kernel holding the factored product; ValueError for any other kernel.

    Tiles of columns, one task each. Where the full-width tiles (four accumulator vectors: four
    independent chains of multiply-adds) are too few for the cores, the chunks are split into
    parts as well rather than the tiles narrowed to one or two chains (``rfactor``: each task sums
    its part of the chunks into a partial row, a last vector loop adds the parts and applies the
    epilogue). The kernel then prefetches the next task's words (``_prefetch``) and is returned as a
    function (left in ``sch`` when ``PREFETCH_TASKS_AHEAD`` is 0)."""
    roles = {_role(sch, b): b for b in root_blocks(sch)}
    if "output" not in roles or "partial" not in roles:
        raise ValueError("not a factored quantized product")
    out, part = roles["output"], roles["partial"]
    _inline_weight_reads(sch, part)
    columns = int(sch.get(part).iter_vars[1].dom.extent)
    chunk, per_word = int(sch.get(part).iter_vars[2].dom.extent), int(sch.get(part).annotations[CODES_PER_WORD])
    epi = _prologue.fold_epilogue(sch, out)
    splits = chunk_splits(columns, int(sch.get(out).iter_vars[-1].dom.extent), lanes, cores)
    if splits > 1:
        parts, chunks = sch.split(sch.get_loops(out)[-1], [splits, None])
        product = sch.rfactor(parts, factor_axis=0)
        *spatial, parts, chunks = sch.get_loops(product)
        tile, lane = sch.split(sch.fuse(*spatial), [None, TILE_VECTORS * lanes])
        sch.reorder(parts, tile, chunks, lane)
        task = sch.fuse(parts, tile)
    else:
        product = out
        *spatial, chunks = sch.get_loops(out)
        task, lane = sch.split(sch.fuse(*spatial), [None, column_tile(columns, lanes, cores)])
        sch.reorder(task, chunks, lane)
    store = sch.cache_write(product, 0, "local")
    sch.reverse_compute_at(store, task, preserve_unit_loops=True)
    sch.compute_at(part, chunks)
    sch.set_scope(part, 0, "local")
    words_buffer = _words_buffer(sch, part)
    if _integer_gemv.INTEGER_DOT in sch.get(part).annotations:
        words, tensorize = _integer_gemv.tensorize_partial(sch, part)
    else:
        words, tensorize = _unroll_partial(sch, part, chunk, per_word), None
    sch.vectorize(lane)
    sch.vectorize(sch.fuse(*sch.get_loops(store)[1:]))
    sch.parallel(task)               # before the reductions are split into init and update blocks
    sch.decompose_reduction(part, words)
    sch.decompose_reduction(product, chunks)
    if tensorize is not None:
        tensorize()
    tile = task if splits == 1 else _sum_parts(sch, out, lanes)
    if epi is not None:
        place_epilogue(sch, epi, tile, lanes)
    return _with_prefetch(sch, task, words, words_buffer)


def _with_prefetch(sch: Schedule, task, words, words_buffer: tirx.Buffer) -> tirx.PrimFunc | None:
    """The scheduled function with the prefetch of the next task's words (None: ``sch`` as it is,
    where ``PREFETCH_TASKS_AHEAD`` is 0 or the words' read is one the prefetch cannot follow)."""
    if not PREFETCH_TASKS_AHEAD:
        return None
    try:
        return _prefetch.prefetch_next_task(sch, task, words, words_buffer, PREFETCH_TASKS_AHEAD)
    except Exception:  # pylint: disable=broad-except
        return None


def _words_buffer(sch: Schedule, part) -> tirx.Buffer:
    """The packed words the partial block reads (its one uint32 operand)."""
    return next(r.source for r in sch.get(part).reads if str(r.source.dtype) == "uint32")


def _inline_weight_reads(sch: Schedule, part) -> None:
    """Inline the blocks before the partial that are neither the activation's (computed once, at
    the root) nor reductions: the read-back of column panels (``pack_weights``) and element-wise
    steps on x, so the kernel indexes the stored words directly."""
    _prologue.inline_before(sch, part, keep=lambda block: _role(sch, block) is not None)


def _unroll_partial(sch: Schedule, part, chunk: int, per_word: int):
    """The chunk's k steps unrolled by the codes of one word, columns as vectors; returns the
    loop over words."""
    column, step = sch.get_loops(part)[-2:]
    outer, inner = sch.split(step, [None, per_word if chunk % per_word == 0 else chunk])
    sch.reorder(outer, inner, column)
    sch.vectorize(column)
    sch.unroll(inner)
    return outer


def _sum_parts(sch: Schedule, out, lanes: int):
    """The sum of the partial rows, vectorized over the columns; returns the column loop."""
    *spatial, parts = sch.get_loops(out)
    columns, lane = sch.split(sch.fuse(*spatial), [None, lanes])
    sch.reorder(columns, parts, lane)
    sch.vectorize(lane)
    sch.decompose_reduction(out, parts)
    return columns

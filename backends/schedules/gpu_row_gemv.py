"""GPU schedule for one-token products over quantized words stored K-contiguous per output.

For CUDA, ``pack_weights`` stores the packed words of a quantized ``[K, N]`` weight transposed,
``Wq[N, K / per_word]`` (``reads_words_transposed``), so output ``n`` reads one contiguous row:

    y[n] = sum_k x[k] * (code(Wq[n, k / per_word], k % per_word) - z[g, n]) * s[g, n],   g = k / group

**Row warps** (``RowGEMV``). A warp owns one output; its 32 lanes split ``K``: lane ``l`` reads
``V`` adjacent words of the row as one vector load (``V = 2``: 8 bytes, 16 int4 codes) at word
``(j * 32 + l) * V`` of step ``j``, so a warp reads ``32 V`` consecutive words per step (whole
128-byte lines). The steps are unrolled into straight-line code, so a lane's loads can issue before
its first multiply. Each lane keeps its partial sum in a register; the 32 partial sums of an output
are added with warp shuffles (TVM's cross-thread all-reduce), and every lane computes the epilogue
of the sum it holds (equal values, equal addresses). ``W`` warps share a thread block
(``threadIdx.y``) and its copy of the activation row in shared memory (16-byte loads, once per
block). The scales and zero points of a lane's ``V per_word`` codes of a step belong to one group
wherever that many codes divide the group size (int4, ``V = 2``: 16 codes), so they are loaded once per
step; ``pack_weights`` stores them transposed with the words, so consecutive groups of a row are
adjacent. Every weight byte is read once, by one thread, and unpacked in registers. (Several
outputs per warp would put a serial loop around the all-reduce, which TVM's lowering of
cross-thread reductions does not support: it leaves the reduction buffer undefined.)

Measured on an H100 (``bench/stage3_cuda_gemv.py``, weights from device memory): 8-byte loads beat
16-byte ones on every product of a 1.1B LLaMA ([2048 -> 11264] 10.4 against 16.3 us, the LM head
25.8 against 41.4 us, [2048 -> 2560] 3.5 against 5.0 us), and with 8-byte loads 4 warps per block
matched or beat 8 on all but the [5632 -> 2048] down projection (6.0 against 5.8 us); reading the
activation from global memory instead of the shared copy was 2.5-5x slower. In a 1.1B LLaMA's int4
one-token step the 8-byte RowGEMV took the step from 0.837 to 0.795 ms, and its scales stored
transposed to 0.747 ms (``bench/results/stage3-cuda-2026-12-08-run2-row-v2-scales``).

**Factored kernels** (``gpu_factored_gemv``, built only where asked for: measured slower) reduce
over chunks of one or two words instead of codes; their activation stages (``xq``, ``xs``, annotated
``ROW_STAGE``) are not inlined but computed once per block into shared memory by all its threads,
``xq`` stored ``[C / 4, chunks, 4]`` (consecutive lanes read consecutive chunks' runs of 4 floats, so a
warp's 16-byte reads hit every bank once); each lane copies its step's values to registers with
16-byte reads. A chunk is one lane load, so the plan's vector is 1. A reduction of the row to one value before the stages (the
sum of squares of an RMS norm merged in by ``gpu_norm_prologue``) is computed by every block too:
each thread sums every ``32 W``-th value, then one block-wide sum (warp shuffles, the warps' sums
through shared memory) leaves the total to all threads.

``RowGEMV(plan)`` fixes the plan (benchmarks compare them); without one, ``plan_rows`` takes the
widest load that divides the row into whole lane steps and ``WARPS`` warps per block.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from slimgraph.backends.schedules.gpu_factored_gemv import ROW_STAGE
from slimgraph.backends.schedules.gpu_blocks import (activation_reads, product_blocks, stage_in_shared,
                                                       static_extent, weight_reads)

LANES = 32           # a warp: the lanes splitting K
VECTORS = (2, 1)     # words per lane and step (8-, 4-byte loads), widest first; 16-byte loads measured slower
WARPS = 4            # warps (outputs) per thread block


@dataclass(frozen=True)
class RowPlan:
    vector: int                  # V: words one lane loads per step
    warps: int = WARPS           # W: warps per thread block, one output each
    shared_activation: bool = True


@dataclass(frozen=True)
class RowShape:
    outputs: int                 # N
    words: int                   # K / per_word: words of one row
    per_word: int                # codes in one 32-bit word


def plan_rows(shape: RowShape) -> RowPlan | None:
    """The default plan for a shape, None where no vector width gives whole lane steps."""
    vector = next((v for v in VECTORS if shape.words % (LANES * v) == 0), None)
    if vector is None:
        return None
    warps = WARPS
    while shape.outputs % warps:
        warps //= 2
    return RowPlan(vector, warps)


def _word_read(block: s_tir.SBlock, n_var: tirx.Var, k_var: tirx.Var) -> tuple[int, int] | None:
    """(index in ``block.reads``, codes per word) of a ``uint32`` read ``Wq[..., n, k // per_word, ...]``
    whose last non-unit index is the word of ``k``; None if the block reads no such words."""
    for i, read in enumerate(block.reads):
        if read.source.dtype != "uint32":
            continue
        indices = [axis.min for axis in read.region
                   if not (static_extent(axis.extent) == 1 and static_extent(axis.min) == 0)]
        if len(indices) < 2 or not indices[-2].same_as(n_var):
            continue
        last = indices[-1]
        if last.same_as(k_var) or (isinstance(last, tirx.Mul) and last.a.same_as(k_var)):
            return i, 1   # the factored kernel (gpu_factored_gemv) reduces over chunks of whole words
        if isinstance(last, tirx.FloorDiv) and last.a.same_as(k_var) and isinstance(last.b, tirx.IntImm):
            return i, int(last.b)
    return None


class RowGEMV:
    """One-token products over ``Wq[N, K / per_word]`` words (static shapes), see the module doc."""

    def __init__(self, plan: RowPlan | None = None):
        self.plan = plan

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        blocks = product_blocks(func, target, keep=ROW_STAGE, row_reductions=True)
        factored = blocks is not None and bool(_stage_blocks(blocks.sch))
        if blocks is None or (blocks.row_reductions and not factored):
            return None
        sch, infos = blocks.sch, blocks.infos
        found = self.row_shape(sch, infos[0])
        if found is None:
            return None
        shape, words_read = found
        plan = self.plan or plan_rows(shape)
        if plan is not None and factored:   # a chunk's words are one load already
            plan = RowPlan(1, plan.warps, plan.shared_activation)
        if plan is None or shape.words % (LANES * plan.vector) or shape.outputs % plan.warps:
            return None
        _schedule_rows(sch, infos[0], infos[1].block_rv if len(infos) == 2 else None, plan, shape, words_read)
        for reduction in blocks.row_reductions:
            _reduce_in_block(sch, reduction.block_rv, plan)
        return sch

    @staticmethod
    def row_shape(sch: s_tir.Schedule, main) -> tuple[RowShape, int] | None:
        """The product's dims and the index of its word read, if ``main`` is a one-token reduction
        over words stored K-contiguous per output; else None."""
        if not main.is_reduction():
            return None
        spatial = [it for it in main.iters if it.kind == "S"]
        reduction = [it for it in main.iters if it.kind == "R"]
        extents = [static_extent(it.dom) for it in spatial + reduction]
        if len(reduction) != 1 or not spatial or None in extents or any(e != 1 for e in extents[:len(spatial) - 1]):
            return None
        block = sch.get(main.block_rv)
        found = _word_read(block, spatial[-1].var, reduction[0].var)
        if found is None:
            return None
        index, per_word = found
        if extents[-1] % per_word:
            return None
        return RowShape(extents[len(spatial) - 1], extents[-1] // per_word, per_word), index


def _schedule_rows(sch: s_tir.Schedule, main, epilogue, plan: RowPlan, shape: RowShape, words_read: int) -> None:
    block = main.block_rv
    n_var = [it.var for it in main.iters if it.kind == "S"][-1]
    words_buffer = sch.get(block).reads[words_read].source
    per_row = [sch.get(block).reads[i].source for i in weight_reads(sch.get(block), n_var)]
    (k_loop,) = [it.loop_rv for it in main.iters if it.kind == "R"]
    bx, warp = sch.split(sch.fuse(*[it.loop_rv for it in main.iters if it.kind == "S"]), [None, plan.warps])
    step, lane, codes = sch.split(k_loop, [None, LANES, plan.vector * shape.per_word])
    sch.reorder(bx, warp, lane, step, codes)
    partial = sch.rfactor(lane, factor_axis=0)
    bx, warp, lane, step, _ = sch.get_loops(partial)
    sch.bind(bx, "blockIdx.x")
    sch.bind(warp, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    reads = [read.source for read in sch.get(partial).reads]
    activations = activation_reads(sch, partial, per_row)
    stages = _stage_blocks(sch)
    for index, source in enumerate(reads):
        if any(source.same_as(b) for b in per_row):   # words, scales, zero points: registers per step
            cache = sch.cache_read(partial, index, "local")
            sch.compute_at(cache, step, preserve_unit_loops=True)
            if source.same_as(words_buffer):   # the step's V words (and trailing unit axes): one load
                loops = sch.get_loops(cache)[-len(source.shape) + 1:]
                sch.vectorize(sch.fuse(*loops) if len(loops) > 1 else loops[0])
    if stages:
        _place_stages(sch, stages, partial, step, bx, plan, shape.words)
    elif plan.shared_activation:
        stage_in_shared(sch, partial, activations, bx, plan.warps, LANES)
    sch.set_scope(partial, 0, "local")
    sch.decompose_reduction(partial, step)
    sch.annotate(lane, ann_key="pragma_auto_unroll_max_step", ann_val=1024)
    sch.annotate(lane, ann_key="pragma_unroll_explicit", ann_val=1)
    # the sum over the lanes: one warp all-reduce per output, after the lanes' partial sums
    sch.reverse_compute_at(block, bx, preserve_unit_loops=True)
    lanes, warps = sch.get_loops(block)[-2:]
    sch.reorder(warps, lanes)
    sch.bind(warps, "threadIdx.y")
    sch.bind(lanes, "threadIdx.x")
    if epilogue is not None:
        sch.set_scope(block, 0, "local")
        sch.reverse_compute_at(epilogue, bx, preserve_unit_loops=True)
        sch.bind(sch.get_loops(epilogue)[-1], "threadIdx.y")


def _stage_blocks(sch: s_tir.Schedule) -> list[tuple[s_tir.SBlockRV, str]]:
    """The blocks annotated ``ROW_STAGE`` (the factored kernel's per-block activation stages)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    return [(rv, str(sch.get(rv).annotations[ROW_STAGE])) for rv in blocks if ROW_STAGE in sch.get(rv).annotations]


def _place_stages(sch: s_tir.Schedule, stages, partial, step, bx, plan: RowPlan, words: int) -> None:
    """Compute the stages once per thread block into shared memory over all its threads, and give
    each lane its step's values in registers. The scaled activations ("codes", ``C`` a chunk) are
    stored ``[C / 4, chunks, 4]``: the run ``q`` of chunk ``c`` at ``(q chunks + c) 4``, so the 32
    lanes (consecutive chunks) of a 16-byte read hit 32 different banks. (The layout is written in
    the chunk index alone: indices that need the lane's bound to simplify leave the register
    copy a buffer over all 32 lanes.)"""
    sources = []
    for block, role in stages:
        buffer = sch.get(block).writes[0].source
        sch.set_scope(block, 0, "shared")
        vector = 1
        if role == "codes":
            run = int(buffer.shape[0]) // words * plan.vector   # values one lane reads per step
            sch.transform_layout(block, ("write", 0), lambda k: [k % run // 4, k // run, k % 4])
            vector = 4
        sch.compute_at(block, bx, preserve_unit_loops=True)
        loops = sch.get_loops(block)[1:]
        _, warp, lane, inner = sch.split(sch.fuse(*loops) if len(loops) > 1 else loops[0],
                                         [None, plan.warps, LANES, vector])
        sch.bind(warp, "threadIdx.y")
        sch.bind(lane, "threadIdx.x")
        if vector > 1:
            sch.vectorize(inner)
        sources.append(sch.get(block).writes[0].source)
    for source in sources:
        index = next(i for i, read in enumerate(sch.get(partial).reads) if read.source.same_as(source))
        cache = sch.cache_read(partial, index, "local")
        sch.compute_at(cache, step, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(cache)[-1])


def _reduce_in_block(sch: s_tir.Schedule, block, plan: RowPlan) -> None:
    """A reduction of the whole row to one value (an RMS norm's sum of squares), computed by every
    thread block before its stages: each of its ``32 W`` threads sums every ``32 W``-th value, then
    one block-wide sum leaves the total in every thread's registers."""
    bx = sch.get_loops(_stage_blocks(sch)[0][0])[0]
    sch.compute_at(block, bx, preserve_unit_loops=True)
    (k_loop,) = [loop for loop in sch.get_loops(block)[1:] if static_extent(sch.get(loop).extent) != 1]
    serial, warp, lane = sch.split(k_loop, [None, plan.warps, LANES])
    sch.reorder(warp, lane, serial)
    sch.bind(warp, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    sch.set_scope(block, 0, "local")

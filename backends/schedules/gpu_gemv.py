"""GPU schedules for matrix-vector products over slimgraph's ``[K, N]`` weight layout.

A linear layer in slimgraph's IR is ``y = x @ W`` with ``W`` stored ``[K, N]`` (row ``k`` holds
the ``N`` outputs' weights of input ``k``); quantized weights are packed along ``K`` into 32-bit
words ``Wq[K / per_word, N]``. A decoding step (one token) makes that a matrix-vector product

    y[n] = sum_k x[k] * W[k, n]

whose reduction runs over the *outer* (row) axis of ``W``. DLight's ``GEMV`` rule schedules that
form only for OpenCL and Metal, and its generic ``Reduction`` rule reads a column of ``W`` with a
stride of ``N`` elements: uncoalesced and far from the memory bandwidth that bounds this kernel.
(For CUDA, ``pack_weights`` stores most packed words transposed, K contiguous per output
(``reads_words_transposed``), and ``RowGEMV`` or DLight's ``GEMV`` reads those; the rule below takes
float weights and the other words.)
``ColumnGEMV`` picks one of two schedules (both read every weight byte once, the dequantize
prologue inlined so packed words are unpacked in registers, the epilogue computed by the threads
that hold the sums):

**Column threads** (``_schedule_column_threads``). A thread block owns ``TX`` adjacent outputs
(``threadIdx.x``), so a warp reads ``TX`` consecutive elements (or packed words) of ``32 / TX``
rows: whole 32-byte sectors. ``TX`` is 32 for wide matrices and narrows to 16 or 8 until there
are ``MIN_COLUMN_BLOCKS`` blocks. ``TY`` groups of threads (``threadIdx.y``, up to 128) split the
rows: group ``t`` sums rows ``k = (j TY + t) KI + i`` (``i`` over the rows of one packed word)
into a register; the ``TY`` partial sums of one output are added by a cross-thread reduction. Many
threads, each with a few 4-byte loads: the most loads in flight where ``N`` is small.

**Vector lanes** (``_schedule_vector_lanes``), for packed weights with many outputs or few rows.
A thread owns ``V`` adjacent outputs and loads the ``V`` words of a row as one vector (8 or 16
bytes); the ``R`` lanes of a warp (``threadIdx.x``) split ``K``: lane ``l`` takes the packed rows
``j R + l``, ``ROWS_IN_FLIGHT`` of them issued before the first use (an unrolled step);
``TY`` groups (``threadIdx.y``) own ``V`` outputs each. The activation row is copied to shared
memory once per block with 16-byte loads. Each lane writes its ``V`` partial sums to shared
memory; after one barrier every lane of a group adds the ``R`` sums of its ``V`` outputs (the same
addresses for the whole warp: broadcast reads) and computes the epilogue; they store equal
values, so no lane needs a guard.

Measured on an H100 in a sweep of schedule variants (int4, group 128, float16 activations; GPU
time per call with the weights rotated over copies larger than L2): the vector lanes take
[2048 -> 5632] from 10.0 to 7.5 us, [2048 -> 32000] from 40.4 to 28.5 us, [576 -> 1536] from
3.5 to 2.8 us, while the column threads stay ahead on [2048 -> 2048] (4.1 against 5.4 us and
more), [2048 -> 256] and [5632 -> 2048] (7.7 against 12.4 us): there ``N / V`` outputs leave too
few threads (and loads in flight) once ``K`` is split over only the 32 lanes of a warp.
``ColumnGEMV`` therefore takes the vector lanes for packed weights when ``N >= VECTOR_MIN_OUTPUTS``
or ``K <= VECTOR_MAX_ROWS``; ``bench/stage3_cuda_gemv.py`` times both schedules on every product
shape of the stage-3 models.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr
from tvm.s_tir.dlight.analysis.gemv import is_gemv
from tvm.target import Target

from slimgraph.backends.schedules.gpu_blocks import (VECTOR_BYTES, activation_reads, product_blocks,
                                                       stage_in_shared, static_extent, weight_reads)

# column threads
THREADS_X = (32, 16, 8)  # outputs per block, widest first: 8 words of a row are one 32-byte sector
MIN_COLUMN_BLOCKS = 256  # narrower blocks until the outputs make this many (two per multiprocessor)
MAX_THREADS = 1024       # CUDA's limit per block: row groups (threadIdx.y) x outputs
MIN_ROWS_PER_THREAD = 4  # loaded elements each thread sums before the cross-thread reduction (16 measured slower)
# vector lanes
VECTOR_MIN_OUTPUTS = 4096          # packed products this wide take the vector lanes ...
VECTOR_MAX_ROWS = 1024             # ... and so do those with this few rows
WIDE_VECTOR_THREADS = 1 << 17      # 16-byte loads once N / V x R reaches this many threads, else 8-byte
LANES = (32, 16, 8, 4, 2, 1)       # lanes splitting K, widest first (the largest that divides the packed rows)
THREADS_PER_BLOCK = 128            # TY groups x R lanes (at most 8 groups)
ROWS_IN_FLIGHT = 4                 # packed rows each thread loads before it uses the first


@dataclass(frozen=True)
class GemvShape:
    outputs: int          # N
    rows: int             # K
    rows_per_word: int    # per_word of the packed weight read, 1 for float weights
    weight_bytes: int     # bytes of one loaded weight element (4 for packed words)


@dataclass(frozen=True)
class GemvPlan:
    vector: int           # V: outputs per thread (one vector load per row)
    lanes: int            # R: lanes splitting K (threadIdx.x)
    groups: int           # TY: thread groups splitting N (threadIdx.y)


def _rows_per_word(block: s_tir.SBlock, k_var: tirx.Var) -> int:
    """How many rows of ``W`` one packed uint32 word holds (``Wq[k // per_word, n]``), else 1."""
    for read in block.reads:
        if read.source.dtype != "uint32":
            continue
        for axis in read.region:
            index = axis.min
            if isinstance(index, tirx.FloorDiv) and index.a.same_as(k_var) and isinstance(index.b, tirx.IntImm):
                return int(index.b)
    return 1


def _reads_rows(block: s_tir.SBlock, k_var: tirx.Var, n_var: tirx.Var) -> bool:
    """Whether the matrix is read with ``n`` as its last (contiguous) index and ``k`` before it."""
    for read in block.reads:
        last = read.region[-1].min
        if last.same_as(n_var) and any(k_var in collect_vars_used_in_prim_expr(axis.min) for axis in read.region[:-1]):
            return True
    return False


def uses_vector_lanes(shape: GemvShape) -> bool:
    """Whether a product takes the vector-lane schedule (measured faster there, see above)."""
    return shape.rows_per_word > 1 and (shape.outputs >= VECTOR_MIN_OUTPUTS or shape.rows <= VECTOR_MAX_ROWS)


def plan_vector_lanes(shape: GemvShape) -> GemvPlan | None:
    """Vector width, lanes and thread groups of the vector-lane schedule; None where none divides."""
    packed_rows = shape.rows // shape.rows_per_word
    if shape.rows % shape.rows_per_word:
        return None
    lanes = next(r for r in LANES if packed_rows % r == 0)
    wide = VECTOR_BYTES // shape.weight_bytes
    vector = wide if shape.outputs // wide * lanes >= WIDE_VECTOR_THREADS else max(1, wide // 2)
    while shape.outputs % vector:
        vector //= 2
    groups = min(8, max(1, THREADS_PER_BLOCK // lanes))
    while shape.outputs % (vector * groups):
        groups //= 2
    return GemvPlan(vector, lanes, groups)


SCHEDULES = ("vector-lanes", "column-threads")


class ColumnGEMV:
    """Matrix-vector products ``y[n] = sum_k x[k] W[k, n]`` (static shapes, one token).
    ``schedule`` forces one of SCHEDULES (benchmarks compare them); None chooses by shape."""

    def __init__(self, schedule: str | None = None):
        if schedule not in (None, *SCHEDULES):
            raise ValueError(f"unknown GEMV schedule {schedule!r}; one of {SCHEDULES}")
        self.schedule = schedule

    def _vector_lanes(self, shape: GemvShape) -> bool:
        return uses_vector_lanes(shape) if self.schedule is None else self.schedule == "vector-lanes"

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        blocks = product_blocks(func, target)
        if blocks is None:
            return None
        sch, infos = blocks.sch, blocks.infos
        shape = self.gemv_shape(sch, infos[0])
        if shape is None:
            return None
        epilogue = infos[1].block_rv if len(infos) == 2 else None
        plan = plan_vector_lanes(shape) if self._vector_lanes(shape) else None
        if plan is not None:
            _schedule_vector_lanes(sch, infos[0], epilogue, shape, plan)
            return sch
        return sch if _schedule_column_threads(sch, infos[0], epilogue, shape) else None

    @staticmethod
    def gemv_shape(sch: s_tir.Schedule, main) -> GemvShape | None:
        """The product's dims if ``main`` is a one-token outer-reduction GEMV, else None."""
        if not main.is_reduction() or is_gemv(sch, main) is None:
            return None
        spatial = [it for it in main.iters if it.kind == "S"]
        reduction = [it for it in main.iters if it.kind == "R"]
        extents = [static_extent(it.dom) for it in spatial + reduction]
        if len(reduction) != 1 or not spatial or None in extents:
            return None
        if any(e != 1 for e in extents[:len(spatial) - 1]):
            return None
        block = sch.get(main.block_rv)
        n_var, k_var = spatial[-1].var, reduction[0].var
        if not _reads_rows(block, k_var, n_var):
            return None
        weights = weight_reads(block, n_var)
        weight_bytes = max(tvm.DataType(block.reads[i].source.dtype).bits // 8 for i in weights)
        return GemvShape(extents[len(spatial) - 1], extents[-1], _rows_per_word(block, k_var), weight_bytes)


def _schedule_vector_lanes(sch: s_tir.Schedule, main, epilogue, shape: GemvShape, plan: GemvPlan) -> None:
    v, r, ty = plan.vector, plan.lanes, plan.groups
    block = main.block_rv
    n_var = [it.var for it in main.iters if it.kind == "S"][-1]
    weight_buffers = [sch.get(block).reads[i].source for i in weight_reads(sch.get(block), n_var)]
    (k_loop,) = [it.loop_rv for it in main.iters if it.kind == "R"]
    bx, group, vec = sch.split(sch.fuse(*[it.loop_rv for it in main.iters if it.kind == "S"]), [None, ty, v])
    ko, lane, ki = sch.split(k_loop, [None, r, shape.rows_per_word])
    sch.reorder(bx, group, lane, ko, ki, vec)
    partial = sch.rfactor(lane, factor_axis=0)
    bx, group, lane, ko, _, _ = sch.get_loops(partial)
    sch.bind(bx, "blockIdx.x")
    sch.bind(group, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    in_flight = ROWS_IN_FLIGHT
    while (shape.rows // shape.rows_per_word // r) % in_flight:
        in_flight //= 2
    ko, ko_inner = sch.split(ko, [None, in_flight])
    reads = [read.source for read in sch.get(partial).reads]
    is_weight = [any(src.same_as(w) for w in weight_buffers) for src in reads]
    activations = activation_reads(sch, partial, weight_buffers)
    for index in [i for i, weight in enumerate(is_weight) if weight]:
        cache = sch.cache_read(partial, index, "local")       # one vector load per row and thread
        sch.compute_at(cache, ko_inner, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(cache)[-1])
    sch.unroll(ko_inner)   # straight-line code: the ROWS_IN_FLIGHT loads issue before the first use
    stage_in_shared(sch, partial, activations, bx, plan.groups, plan.lanes)
    # the lanes' partial sums: registers while summing, shared memory for the sum across lanes
    sch.set_scope(partial, 0, "shared")
    sch.reverse_compute_at(sch.cache_write(partial, 0, "local"), lane, preserve_unit_loops=True)
    sch.decompose_reduction(partial, ko)
    sch.annotate(lane, ann_key="pragma_auto_unroll_max_step", ann_val=256)
    sch.annotate(lane, ann_key="pragma_unroll_explicit", ann_val=1)
    sch.reverse_compute_at(block, bx, preserve_unit_loops=True)
    outputs = sch.get_loops(block)[-1]
    sum_group, _ = sch.split(outputs, [ty, v])
    sch.bind(sum_group, "threadIdx.y")
    if epilogue is not None:
        sch.set_scope(block, 0, "local")
        sch.reverse_compute_at(epilogue, sum_group, preserve_unit_loops=True)


def _schedule_column_threads(sch: s_tir.Schedule, main, epilogue, shape: GemvShape) -> bool:
    """The column-thread schedule (see above); False where no thread layout divides the product."""
    n_extent, k_extent, rows_per_word = shape.outputs, shape.rows, shape.rows_per_word
    threads_x = next((tx for tx in THREADS_X if n_extent % tx == 0 and n_extent // tx >= MIN_COLUMN_BLOCKS),
                     THREADS_X[-1])
    fits = [ty for ty in (128, 64, 32, 16, 8, 4, 2, 1)
            if ty * threads_x <= MAX_THREADS and k_extent % (ty * rows_per_word) == 0]
    if n_extent % threads_x or not fits:
        return False
    # the most row groups that leave each thread MIN_ROWS_PER_THREAD loads, else one group
    rows_per_group = next((ty for ty in fits if k_extent // (ty * rows_per_word) >= MIN_ROWS_PER_THREAD), fits[-1])
    block = main.block_rv
    (k_loop,) = [it.loop_rv for it in main.iters if it.kind == "R"]
    bx, tx = sch.split(sch.fuse(*[it.loop_rv for it in main.iters if it.kind == "S"]), [None, threads_x])
    ko, ty, ki = sch.split(k_loop, [None, rows_per_group, rows_per_word])
    sch.reorder(bx, tx, ty, ko, ki)
    partial = sch.rfactor(ty, factor_axis=0)
    bx, tx, ty = sch.get_loops(block)[-3:]
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.annotate(tx, ann_key="pragma_auto_unroll_max_step", ann_val=256)
    sch.annotate(tx, ann_key="pragma_unroll_explicit", ann_val=1)
    sch.compute_at(partial, tx, preserve_unit_loops=True)
    loops = sch.get_loops(partial)  # bx, tx, row group, (unit n), row blocks, rows of a word
    sch.bind(loops[2], "threadIdx.y")
    sch.set_scope(partial, 0, "local")
    sch.decompose_reduction(partial, loops[-2])
    if epilogue is not None:
        sch.set_scope(block, 0, "local")
        sch.reverse_compute_at(epilogue, tx, preserve_unit_loops=True)
    return True

"""GPU schedule for matrix-vector products over slimgraph's ``[K, N]`` weight layout.

A linear layer in slimgraph's IR is ``y = x @ W`` with ``W`` stored ``[K, N]`` (row ``k`` holds
the ``N`` outputs' weights of input ``k``); quantized weights are packed along ``K`` into 32-bit
words ``Wq[K / per_word, N]``. A decoding step (one token) makes that a matrix-vector product

    y[n] = sum_k x[k] * W[k, n]

whose reduction runs over the *outer* (row) axis of ``W``. DLight's ``GEMV`` rule schedules that
form only for OpenCL and Metal, and its generic ``Reduction`` rule gives one thread block per output
reading a column of ``W`` with a stride of ``N`` elements: uncoalesced and far from the memory
bandwidth that bounds this kernel.

This rule reads ``W`` row by row instead. A thread block owns ``TX`` adjacent outputs
(``threadIdx.x``), so a warp reads ``TX`` consecutive elements (or packed words) of ``32 / TX`` rows:
whole 32-byte sectors. ``TX`` is 32 for wide matrices and narrows to 16 or 8 until there are
``MIN_BLOCKS`` blocks, so that a 2048-wide projection still occupies every multiprocessor of a
large GPU (132 on an H100). ``TY`` groups of threads (``threadIdx.y``) split the rows: group ``t`` sums
rows ``k = (j * TY + t) * KI + i`` for its ``j`` (unrolled) and the ``KI`` rows of one packed word
``i``, into a register; the ``TY`` partial sums of one output are then added by a cross-thread
reduction. The dequantize prologue is inlined, so each packed word is loaded once and unpacked in
registers; the epilogue (bias, cast, activation, residual) is computed by the same threads.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr, normalize_prim_func
from tvm.s_tir.dlight.analysis.gemv import is_gemv
from tvm.s_tir.dlight.base.common_schedules import try_inline_contiguous_spatial
from tvm.target import Target

THREADS_X = (32, 16, 8)  # outputs per block, widest first: 8 words of a row are one 32-byte sector
MIN_BLOCKS = 256         # narrower blocks until the outputs make this many (two per multiprocessor)
MAX_THREADS = 1024       # CUDA's limit per block: row groups (threadIdx.y) x outputs
MIN_ROWS_PER_THREAD = 4  # loaded elements each thread sums before the cross-thread reduction (16 measured slower)


def _static(extent) -> int | None:
    return int(extent) if isinstance(extent, (int, tirx.IntImm)) else None


def _rows_per_word(block: s_tir.SBlock, k_var: tirx.Var) -> int:
    """How many rows of ``W`` one loaded element holds: ``per_word`` for a packed read
    ``Wq[k // per_word, n]``, else 1."""
    for read in block.reads:
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


class ColumnGEMV:
    """Matrix-vector products ``y[n] = sum_k x[k] W[k, n]`` (static shapes, one token)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if target.kind.name != "cuda":
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if infos is None or len(infos) not in (1, 2) or (len(infos) == 2 and not infos[1].is_injective()):
            return None
        main = infos[0]
        shape = self._gemv_shape(sch, main)
        if shape is None:
            return None
        n_extent, k_extent, rows_per_word = shape
        threads_x = next((tx for tx in THREADS_X if n_extent % tx == 0 and n_extent // tx >= MIN_BLOCKS), THREADS_X[-1])
        if n_extent % threads_x:
            return None
        fits = [ty for ty in (128, 64, 32, 16, 8, 4, 2, 1)
                if ty * threads_x <= MAX_THREADS and k_extent % (ty * rows_per_word) == 0]
        if not fits:
            return None
        # the most row groups that leave each thread MIN_ROWS_PER_THREAD loads, else one group
        rows_per_group = next((ty for ty in fits if k_extent // (ty * rows_per_word) >= MIN_ROWS_PER_THREAD), fits[-1])
        self._schedule(sch, main, infos[1] if len(infos) == 2 else None, threads_x, rows_per_group, rows_per_word)
        return sch

    @staticmethod
    def _gemv_shape(sch: s_tir.Schedule, main) -> tuple[int, int, int] | None:
        """(N, K, rows per loaded element) of a one-token outer-reduction GEMV, else None."""
        if not main.is_reduction() or is_gemv(sch, main) is None:
            return None
        spatial = [it for it in main.iters if it.kind == "S"]
        reduction = [it for it in main.iters if it.kind == "R"]
        extents = [_static(it.dom) for it in spatial + reduction]
        if len(reduction) != 1 or not spatial or None in extents:
            return None
        if any(e != 1 for e in extents[:len(spatial) - 1]):
            return None
        block = sch.get(main.block_rv)
        n_var, k_var = spatial[-1].var, reduction[0].var
        if not _reads_rows(block, k_var, n_var):
            return None
        return extents[len(spatial) - 1], extents[-1], _rows_per_word(block, k_var)

    @staticmethod
    def _schedule(sch: s_tir.Schedule, main, epilogue, threads_x: int, rows_per_group: int, rows_per_word: int) -> None:
        block = main.block_rv
        spatial = [it.loop_rv for it in main.iters if it.kind == "S"]
        (k_loop,) = [it.loop_rv for it in main.iters if it.kind == "R"]
        n_loop = sch.fuse(*spatial)
        bx, tx = sch.split(n_loop, [None, threads_x])
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
        partial_ko = loops[-2]
        sch.set_scope(partial, 0, "local")
        sch.decompose_reduction(partial, partial_ko)
        if epilogue is not None:
            sch.set_scope(block, 0, "local")
            sch.reverse_compute_at(epilogue.block_rv, tx, preserve_unit_loops=True)

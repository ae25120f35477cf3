"""Register-blocked matmul / batch-matmul / GEMV schedules for x86 CPUs.

GEMM tiling (``C[b, i, j] = sum_k A[b, i, k] * B[b, k, j]``, then epilogue)::

    parallel  b, jo              # panels of NB output columns, per batch
      Bp[K, NB] = pack(B)        # contiguous panel; transposes an x @ W^T weight
      for io                     # MR rows of A at a time (symbolic M: predicated)
        for jm                   # NB / NR micro tiles
          Cl[MR, NR] = 0         # accumulators: MR x NR/lanes vector registers
          for k: for ii (unrolled): for ji (vector): Cl += A[i, k] * Bp[k, j]
          C[..] = epilogue(Cl)   # bias / activation / gating fused here

GEMV (M == 1) has nothing to reuse, so B is streamed once: with ``W[j, k]``
(k contiguous) each output is a dot product, vectorized over k through
``rfactor``; with ``B[k, j]`` the j axis is vectorized directly.
"""

from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import SBlockRV

from ._analysis import Contraction, analyze_contraction, const_extent, is_reduction, root_blocks

MR = 4  # rows of A per micro tile
NR_VECTORS = 4  # vector registers per accumulator row (MR x NR_VECTORS accumulators)
PANEL_TILES = 1  # micro tiles per packed B panel
GEMV_ROWS = 4  # outputs per GEMV work item


def find_contraction(sch: Schedule) -> tuple[SBlockRV, Contraction] | None:
    """The single contraction block of the function (all others injective)."""
    found = None
    for block in root_blocks(sch):
        if not is_reduction(sch, block):
            continue
        info = analyze_contraction(sch.get(block))
        if info is None or found is not None:
            return None
        found = (block, info)
    return found


def _inline_around(sch: Schedule, mm: SBlockRV) -> SBlockRV | None:
    """Inline prologue blocks into the matmul and fold the epilogue chain into
    its last block. Returns the epilogue block (None when there is none)."""
    blocks = root_blocks(sch)
    pos = [n for n, b in enumerate(blocks) if sch.get(b).same_as(sch.get(mm))][0]
    for block in blocks[:pos]:
        sch.compute_inline(block)
    after = blocks[pos + 1 :]
    for block in after[:-1]:
        sch.compute_inline(block)
    return after[-1] if after else None


def _epilogue_matches(sch: Schedule, epi: SBlockRV, mm: SBlockRV) -> bool:
    """True when the epilogue reads the matmul output at exactly its own
    iterators (same shape, no reshape), so both can share one loop nest."""
    out = sch.get(mm).writes[0].source
    block = sch.get(epi)
    ivars = [iv.var for iv in block.iter_vars]
    for region in block.reads:
        if region.source.same_as(out):
            mins = [r.min for r in region.region]
            exts = [const_extent(r.extent) for r in region.region]
            return len(mins) == len(ivars) and all(
                isinstance(m, tirx.Var) and m.same_as(v) and e == 1
                for m, v, e in zip(mins, ivars, exts)
            )
    return False


def _pick_tiles(n: int | None, lanes: int) -> tuple[int, int]:
    """(NR, NB): micro-tile width and packed panel width for N columns.

    NR is a power-of-two number of vectors (odd vector counts such as 3 x 16
    made LLVM emit 10x slower code) that divides N when possible."""
    nr = lanes * NR_VECTORS
    while n is not None and nr > lanes and n % nr != 0:
        nr //= 2
    if n is not None and n <= nr:
        return n, n
    nb = nr * PANEL_TILES
    if n is not None and n % nb != 0:
        nb = nr
    return nr, nb


def schedule_gemm(sch: Schedule, lanes: int) -> None:
    """Apply the packed, register-blocked GEMM schedule described above."""
    mm, info = find_contraction(sch)
    epi = _inline_around(sch, mm)
    if epi is None or not _epilogue_matches(sch, epi, mm):
        epi = sch.cache_write(mm, 0, "global")
    sch.set_scope(mm, 0, "local")
    loops = sch.get_loops(epi)
    n = const_extent(sch.get(loops[-1]).extent)
    nr, nb = _pick_tiles(n, lanes)
    jo, jm, ji = sch.split(loops[-1], [None, nb // nr, nr])
    io, ii = sch.split(loops[-2], [None, MR])
    sch.reorder(*loops[:-2], jo, io, jm, ii, ji)
    par = sch.fuse(*loops[:-2], jo)
    sch.compute_at(mm, jm, preserve_unit_loops=True)
    _pack_b(sch, mm, info, par)
    sch.parallel(par)
    _vectorize_tile(sch, ii, ji)
    _micro_kernel(sch, mm)


def _micro_kernel(sch: Schedule, mm: SBlockRV) -> None:
    """k outermost inside the tile, rows unrolled, columns vectorized."""
    mi, mj, mk = sch.get_loops(mm)[-3:]
    sch.reorder(mk, mi, mj)
    _vectorize_tile(sch, mi, mj)
    sch.decompose_reduction(mm, mk)


def _vectorize_tile(sch: Schedule, rows, cols) -> None:
    sch.unroll(rows)
    sch.vectorize(cols)


def _pack_b(sch: Schedule, mm: SBlockRV, info: Contraction, par) -> None:
    """Copy the B panel of this parallel iteration into a contiguous [K, NB]
    buffer (transposing ``W[j, k]``), so the micro kernel streams it linearly."""
    bp = sch.cache_read(mm, info.b_index, "global")
    sch.compute_at(bp, par, preserve_unit_loops=True)
    if info.b_k_contiguous:
        ndim = len(sch.get(bp).writes[0].source.shape)
        perm = list(range(ndim - 2)) + [ndim - 1, ndim - 2]
        sch.transform_layout(bp, ("write", 0), lambda *idx: [idx[p] for p in perm])
    else:
        sch.vectorize(sch.get_loops(bp)[-1])


def is_gemv(sch: Schedule) -> bool:
    """A contraction whose output has a single row (M == 1, e.g. decoding)."""
    found = find_contraction(sch)
    if found is None:
        return False
    mm, info = found
    if info.i is None:
        return True
    return const_extent(sch.get(mm).iter_vars[info.i].dom.extent) == 1


def schedule_gemv(sch: Schedule, lanes: int) -> None:
    """Stream B once: parallel over groups of GEMV_ROWS outputs; the k loop is
    vectorized (rfactor into ``lanes`` partial sums) when k is B's contiguous
    axis, otherwise the j axis is vectorized like a one-row GEMM."""
    mm, info = find_contraction(sch)
    if not info.b_k_contiguous:
        schedule_gemm(sch, lanes)
        return
    epi = _inline_around(sch, mm)
    ko, ki = sch.split(sch.get_loops(mm)[-1], [None, lanes])
    rf = sch.rfactor(ki, factor_axis=0)
    sch.set_scope(rf, 0, "local")
    spatial = sch.get_loops(mm)[:-1]
    jo, ji = sch.split(sch.fuse(*spatial), [None, GEMV_ROWS])
    sch.compute_at(rf, ji, preserve_unit_loops=False)
    lane, k_outer = sch.get_loops(rf)[-2:]
    sch.reorder(k_outer, lane)
    if epi is not None:
        sch.reverse_compute_at(epi, jo, preserve_unit_loops=True)
    sch.parallel(jo)
    sch.vectorize(sch.get_loops(rf)[-1])
    sch.decompose_reduction(rf, sch.get_loops(rf)[-2])


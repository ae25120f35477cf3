"""Register-blocked matmul / batch-matmul / GEMV schedules for x86 CPUs.

GEMM tiling (``C[b, i, j] = sum_k A[b, i, k] * B[b, k, j]``, then epilogue)::

    Ap = pad(A)                  # rows zero-padded to a multiple of MR (x row parts)
    parallel  b, ip, jo          # batch x row parts x panels of NB output columns
      Bp[K, NB] = pack(B)        # contiguous panel; transposes an x @ W^T weight
                                 # (weights stored as column panels are read in place)
      for io                     # MR rows of Ap at a time (never a partial tile)
        for jm                   # NB / NR micro tiles
          Cl[MR, NR] = 0         # accumulators: MR x NR/lanes vector registers
          for k: for ii (unrolled): for ji (vector): Cl += Ap[i, k] * Bp[k, j]
          C[..] = epilogue(Cl)   # bias / activation / gating; only real rows stored

Padding (``pad_einsum``) makes the micro kernel unconditional for a symbolic
row count T (and a symbolic N, e.g. ``q @ k^T``): only the epilogue checks
``i < T``. The copy costs K x T loads, against K x T x N FMAs. Row parts split
the rows over the cores when the panels alone would not balance (9 panels of
N=576 on 2 cores); with a symbolic T the panels are narrowed instead.
A ``B[k, j]`` that is exactly one panel wide is read in place, and so is a weight
stored as column panels (``pack_weights``: ``B[k, j] = Wp[j // P, k, j % P]``, NB dividing
P): each task's columns then lie contiguous in every row of one stored panel, so a packed
copy would only add a write and a read of the weights per call (for an LM head, a workspace
as large as the weights) and spread the panel's rows a full B row apart. A computed
operand (rotary embedding, GQA broadcast of K or V) is computed once into its
padded copy or packed panel (``_prologue``), never inside the micro kernel; the
reduction depth may be symbolic (``P @ V`` reduces over T).

One-row products (M == 1, decoding) have their own schedules in ``_gemv``.
"""

from tvm import sym, tirx
from tvm.ir import TensorLoad
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import SBlockRV

from . import _prologue
from ._generic import parallel_vectorize
from ._analysis import Contraction, analyze_contraction, const_extent, divisible, is_reduction, root_blocks

MR = 6  # rows of A per micro tile: 6 x NR_VECTORS = 24 accumulators, with the B row and a broadcast 29 of 32 registers
NR_VECTORS = 4  # vector registers per accumulator row (MR x NR_VECTORS accumulators)
PANEL_TILES = 1  # micro tiles per packed B panel
MIN_DEPTH = 4  # shorter reductions, e.g. an outer product, use the generic schedules


def find_contraction(sch: Schedule) -> tuple[SBlockRV, Contraction] | None:
    """The single contraction block of the function. The others are injective, or reductions
    before it that its prologue reads (the block maxima of ``dynamic_quantize``)."""
    found = None
    for block in root_blocks(sch):
        if not is_reduction(sch, block):
            continue
        info = analyze_contraction(sch.get(block))
        if info is None and found is None:
            continue
        if info is None or found is not None:
            return None
        found = (block, info)
    return found


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
    made LLVM emit 10x slower code) that divides N when possible; a symbolic N
    is padded to a multiple of NR."""
    nr = lanes * NR_VECTORS
    while n is not None and nr > lanes and n % nr != 0:
        nr //= 2
    if n is not None and n <= nr:
        return n, n
    nb = nr * PANEL_TILES
    if n is None or n % nb != 0:
        nb = nr
    return nr, nb


def _pad_rows_cols(sch: Schedule, mm: SBlockRV, info: Contraction, nr: int, row_multiple: int) -> bool:
    """Pad the matmul's iteration domain so that every micro tile is full.

    Rows (symbolic T, or not a multiple of ``row_multiple`` = MR x row parts) are padded and
    a symbolic column count to a multiple of NR: ``pad_einsum`` copies A (and a
    B indexed by the padded column) into zero-padded buffers and makes the
    matmul write a padded result, so the micro kernel has no bounds checks; only
    the epilogue, which stores the real rows, keeps a row predicate. Returns
    whether it padded (False also when the block is not an einsum: its tiles
    are then predicated)."""
    iters = sch.get(mm).iter_vars
    padding = [1] * len(iters)
    if info.i is not None and not divisible(iters[info.i].dom.extent, row_multiple):
        padding[info.i] = row_multiple
    if not divisible(iters[info.j].dom.extent, nr):
        padding[info.j] = nr
    if all(p == 1 for p in padding):
        return False
    try:
        sch.pad_einsum(mm, padding)
    except Exception:  # pylint: disable=broad-except
        return False
    return True


def schedule_gemm(sch: Schedule, lanes: int, cores: int = 1) -> None:
    """Apply the packed, register-blocked GEMM schedule described above."""
    mm, info = find_contraction(sch)
    depth = const_extent(sch.get(mm).iter_vars[info.k].dom.extent)
    if depth is not None and depth < MIN_DEPTH:
        raise ValueError(f"reduction depth {depth} too short for the register-blocked GEMM")
    operands = _prologue.materialize_operands(sch, mm)
    _parallel_prologue_reductions(sch, mm)
    epi = _prologue.fold_epilogue(sch, mm)
    n = const_extent(sch.get(mm).iter_vars[info.j].dom.extent)
    nr, nb = _pick_tiles(n, lanes)
    parts = _row_parts(sch, mm, info, n, nb, cores)
    if parts == 1 and _tasks(sch, mm, info, n, nb) % cores and nb == nr and nr // 2 >= lanes:
        nr = nb = nr // 2  # rows not split (symbolic or few): balance with narrower panels
    padded_cols = not divisible(sch.get(mm).iter_vars[info.j].dom.extent, nr)
    padded = _pad_rows_cols(sch, mm, info, nr, MR * parts)
    _prologue.inline_into_copies(sch, mm, operands)
    epi = _tile_epilogue(sch, mm, epi, padded, lanes)
    sch.set_scope(mm, 0, "local")
    loops = sch.get_loops(mm)
    spatial = [loops[p] for p in info.batch]
    jo, jm, ji = sch.split(loops[info.j], [None, nb // nr, nr])
    outer, rows = [], []
    if info.i is not None:
        io, ii = sch.split(loops[info.i], [None, MR])
        ip, io = sch.split(io, [parts, None])
        outer, rows = [ip], [io]
    k = loops[info.k]
    sch.reorder(*spatial, *outer, jo, *rows, jm, k, *([ii] if rows else []), ji)
    par = sch.fuse(*spatial, *outer, jo)
    sch.reverse_compute_at(epi, jm, preserve_unit_loops=True)
    in_place = _inline_panel_view(sch, mm, info, nb)
    copies = list(sch.get_producers(mm))
    packed = None if in_place else _pack_b(sch, mm, info, par, nb)
    if packed is not None and not (padded and padded_cols):
        copies = _prologue.fill_pack(sch, packed, copies)
    _schedule_pad_copies(sch, copies, lanes)
    sch.parallel(par)
    _vectorize_epilogue(sch, epi, lanes)
    if rows:
        sch.unroll(ii)
    sch.vectorize(ji)
    sch.decompose_reduction(mm, k)


def _parallel_prologue_reductions(sch: Schedule, mm: SBlockRV) -> None:
    """Reductions the prologue reads (the block maxima of ``dynamic_quantize``, one per 32 values of
    A) run before the product, in parallel over their outputs."""
    blocks = root_blocks(sch)
    for block in blocks[:_prologue.position(sch, blocks, mm)]:
        if is_reduction(sch, block):
            kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
            spatial = [loop for loop, kind in zip(sch.get_loops(block), kinds) if kind == tirx.IterVar.DataPar]
            sch.parallel(sch.fuse(*spatial))


def _row_parts(sch: Schedule, mm: SBlockRV, info: Contraction, n: int | None, nb: int, cores: int) -> int:
    """Row blocks per parallel task: 1, or ``cores`` when the (batch x panel)
    tasks would not spread evenly over the cores (e.g. 9 panels of N=576 on 2
    cores); the B panel is then packed once per row part. Only for a static
    row count of at least 4 tiles per core (with a symbolic one TVM cannot
    prove the split exact and would predicate the micro kernel)."""
    rows = None if info.i is None else const_extent(sch.get(mm).iter_vars[info.i].dom.extent)
    if rows is None or rows < 4 * MR * cores or cores <= 1:
        return 1
    return 1 if _tasks(sch, mm, info, n, nb) % cores == 0 else cores


def _tasks(sch: Schedule, mm: SBlockRV, info: Contraction, n: int | None, nb: int) -> int:
    """Parallel tasks of one row part: batch x column panels (0 when unknown)."""
    if n is None:
        return 0
    tasks = -(-n // nb)
    for pos in info.batch:
        extent = const_extent(sch.get(mm).iter_vars[pos].dom.extent)
        if extent is None:
            return 0
        tasks *= extent
    return tasks


def _tile_epilogue(sch: Schedule, mm: SBlockRV, epi: SBlockRV | None, padded: bool, lanes: int) -> SBlockRV:
    """The block that stores each finished micro tile.

    The matmul result only lives in registers, so some block must read it at
    the matmul's own indices: the fused epilogue when it matches, else a plain
    copy (``pad_einsum``'s un-padding copy, or a ``cache_write``). An epilogue
    that does not match (e.g. a reshape) then runs as its own loop nest."""
    store = sch.get_consumers(mm)[0] if padded else None
    producer = store if padded else mm
    if epi is not None and _epilogue_matches(sch, epi, producer):
        if padded:
            sch.compute_inline(store)
        return epi
    if store is None:
        store = sch.cache_write(mm, 0, "global")
    if epi is not None:
        parallel_vectorize(sch, sch.get_loops(epi), lanes)
    return store


def _vectorize_epilogue(sch: Schedule, epi: SBlockRV, lanes: int) -> None:
    """The epilogue loops under the tile are (.., rows, columns): unroll rows,
    vectorize columns."""
    loops = sch.get_loops(epi)
    if len(loops) >= 2:
        sch.unroll(loops[-2])
    sch.vectorize(loops[-1])


def _schedule_pad_copies(sch: Schedule, pads: list, lanes: int) -> None:
    """The zero-padded operand copies made by ``pad_einsum``: parallel rows; the
    row is split into vectors when its length is a known multiple of the lanes
    (a symbolic row is left to LLVM, a predicated vector loop would be scalar)."""
    for block in pads:
        loops = sch.get_loops(block)
        if len(loops) < 2:
            continue
        sch.parallel(sch.fuse(*loops[:-1]))
        if divisible(sch.get(loops[-1]).extent, lanes):
            _, inner = sch.split(loops[-1], [None, lanes])
            sch.vectorize(inner)


def _inline_panel_view(sch: Schedule, mm: SBlockRV, info: Contraction, nb: int) -> bool:
    """Inline B's producer into the matmul when it views a buffer stored as column panels,
    ``B[k, j] = Wp[j // P, k, j % P]`` with NB dividing P, so the micro kernel reads the
    task's columns of each stored panel row in place (True), else leave it (False)."""
    if info.b_k_contiguous:
        return False
    view = _producer_of(sch, mm, sch.get(mm).reads[info.b_index].source)
    if view is None or not _is_panel_view(sch.get(view), nb):
        return False
    sch.compute_inline(view)
    return True


def _producer_of(sch: Schedule, mm: SBlockRV, buffer: tirx.Buffer) -> SBlockRV | None:
    """The block before ``mm`` that writes ``buffer`` (None if a parameter or several do)."""
    writers = [b for b in sch.get_producers(mm) if sch.get(b).writes[0].source.same_as(buffer)]
    return writers[0] if len(writers) == 1 else None


def _is_panel_view(block, nb: int) -> bool:
    """``block`` is ``B[k, j] = Wp[j // P, k, j % P]`` for a [N / P, K, P] buffer ``Wp`` with
    NB dividing P."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or len(store.indices) != 2:
        return False
    load = store.value
    if not isinstance(load, TensorLoad) or len(load.source.shape) != 3:
        return False
    width = const_extent(load.source.shape[2])
    if width is None or width % nb:
        return False
    k, j = store.indices
    expected = (tirx.floordiv(j, width), k, tirx.floormod(j, width))
    analyzer = sym.Analyzer()
    return all(analyzer.can_prove_equal(got, want) for got, want in zip(load.indices, expected))


def _pack_b(sch: Schedule, mm: SBlockRV, info: Contraction, par, nb: int) -> SBlockRV | None:
    """Copy the B panel of this parallel iteration into a contiguous [K, NB]
    buffer (transposing ``W[j, k]``), so the micro kernel streams it linearly.
    A ``B[k, j]`` whose rows are exactly one panel wide (e.g. ``P @ V`` with
    V's 64 columns) is already laid out that way and is read in place (returns None)."""
    n = const_extent(sch.get(mm).iter_vars[info.j].dom.extent)
    if not info.b_k_contiguous and n == nb:
        return None
    bp = sch.cache_read(mm, info.b_index, "global")
    sch.compute_at(bp, par, preserve_unit_loops=True)
    if info.b_k_contiguous:
        ndim = len(sch.get(bp).writes[0].source.shape)
        perm = list(range(ndim - 2)) + [ndim - 1, ndim - 2]
        sch.transform_layout(bp, ("write", 0), lambda *idx: [idx[p] for p in perm])
    else:
        sch.vectorize(sch.get_loops(bp)[-1])
    return bp

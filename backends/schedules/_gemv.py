"""One-row matrix products (M == 1: decoding steps) for x86 CPUs: stream the weights once.

A one-row product ``y[j] = sum_k x[k] * B[k, j]`` reuses nothing of B, so its speed is the rate
at which B is read; padding the row to a GEMM micro tile would multiply the arithmetic by the
tile height and packing B would copy it. Two layouts:

* ``W[j, k]`` (k contiguous, a torch Linear weight): each output is a dot product, vectorized
  over k through ``rfactor`` into ``lanes`` partial sums; parallel over groups of outputs;
* ``B[k, j]`` (j contiguous, slimgraph's ``x @ W`` layout and its packed int4/int8 words):
  parallel over tiles of ``width`` columns; each tile keeps ``width / lanes`` vector accumulators
  in registers while k runs (``acc[j..j+width] += x[k] * B[k, j..j+width]``), so every element of
  B is loaded once, as a contiguous vector.

When the columns give fewer full-width tiles than ``TASKS_PER_CORE`` per core (576 or 192 columns
on 2 cores), the depth is split instead of the tiles being narrowed (a narrow tile reads a short
piece of every row): ``S`` tasks per tile each sum ``K / S`` rows into a partial row
``part[s, j]`` (``rfactor``), and a last vector loop adds the S partial rows and applies the
epilogue. Each task then reads one contiguous block of a weight stored as column panels
(``slimgraph.passes.pack_weights``).

A dequantize prologue is inlined into the product: packed words are read from memory and
unpacked in registers (``(word >> 4 (k mod 8)) & 15``, minus the zero point, times the group
scale), never stored as floats. The k loop is unrolled by ``K_UNROLL`` (the 8 codes of a 4-bit
word), which turns the shift amounts into constants and lets the 8 steps share one word load.
"""

from tvm.s_tir import Schedule
from tvm.s_tir.schedule import SBlockRV

from . import _prologue
from ._analysis import const_extent
from ._generic import parallel_vectorize
from ._matmul import find_contraction

DOT_ROWS = 4  # outputs per work item of the k-contiguous product
MAX_DOT_ROWS = 8  # rows of A the few-row product takes (query heads sharing a cache head)
DOT_CHUNK = 16  # B rows (cached keys) per task of the few-row product
K_UNROLL = 8  # k steps per unrolled body of the column product (codes of one 4-bit word)
TASKS_PER_CORE = 8  # column tiles are narrowed (or the depth split) until each core has this many
TILE_VECTORS = 4  # vectors of a full-width column tile (independent accumulator chains)
MIN_SPLIT_ROWS = 64  # rows of a depth part at least


def is_gemv(sch: Schedule) -> bool:
    """A contraction whose output has a single row (M == 1, e.g. decoding)."""
    found = find_contraction(sch)
    if found is None:
        return False
    mm, info = found
    if info.i is None:
        return True
    return const_extent(sch.get(mm).iter_vars[info.i].dom.extent) == 1


def schedule_gemv(sch: Schedule, lanes: int, cores: int = 1) -> None:
    """The one-row product for B's layout; raises ValueError where neither schedule applies."""
    mm, info = find_contraction(sch)
    if info.b_k_contiguous:
        _schedule_dot_products(sch, mm, lanes)
    else:
        _schedule_column_product(sch, mm, info, lanes, cores)


def _schedule_dot_products(sch: Schedule, mm: SBlockRV, lanes: int) -> None:
    epi = _prologue.inline_around(sch, mm)
    ko, ki = sch.split(sch.get_loops(mm)[-1], [None, lanes])
    rf = sch.rfactor(ki, factor_axis=0)
    sch.set_scope(rf, 0, "local")
    spatial = sch.get_loops(mm)[:-1]
    jo, ji = sch.split(sch.fuse(*spatial), [None, DOT_ROWS])
    sch.compute_at(rf, ji, preserve_unit_loops=False)
    lane, k_outer = sch.get_loops(rf)[-2:]
    sch.reorder(k_outer, lane)
    if epi is not None:
        sch.reverse_compute_at(epi, jo, preserve_unit_loops=True)
    sch.parallel(jo)
    sch.vectorize(sch.get_loops(rf)[-1])
    sch.decompose_reduction(rf, sch.get_loops(rf)[-2])


def schedule_row_dots(sch: Schedule, lanes: int) -> None:
    """A few rows against many k-contiguous B rows (decoding attention: the stacked query heads of a
    cache head against its L cached keys, L symbolic): parallel over chunks of DOT_CHUNK columns;
    each B row is read once for all of A's rows, each dot product summed in ``lanes`` vector partial
    sums. ValueError where the shape does not fit (then the GEMM rule is tried)."""
    found = find_contraction(sch)
    if found is None or not found[1].b_k_contiguous or found[1].i is None:
        raise ValueError("not a few-row product over a k-contiguous B")
    mm, info = found
    block = sch.get(mm)
    rows, depth = (const_extent(block.iter_vars[p].dom.extent) for p in (info.i, info.k))
    if rows is None or rows > MAX_DOT_ROWS or depth is None or depth % lanes or info.k != len(block.iter_vars) - 1:
        raise ValueError("the few-row product needs at most MAX_DOT_ROWS static rows and a depth of whole vectors")
    epi = _prologue.inline_around(sch, mm)
    ko, ki = sch.split(sch.get_loops(mm)[-1], [None, lanes])
    rf = sch.rfactor(ki, factor_axis=0)     # before the column split: rfactor drops its predicate
    sch.set_scope(rf, 0, "local")
    loops = sch.get_loops(mm)
    jo, ji = sch.split(loops[info.j], [None, DOT_CHUNK])
    sch.reorder(jo, *[loops[p] for p in info.batch], ji, loops[info.i], loops[-1])
    task = jo       # fusing it with the batch would divide by the symbolic chunk count (not affine)
    at = len(sch.get_loops(mm)) - 1
    sch.compute_at(rf, sch.get_loops(mm)[at - 1], preserve_unit_loops=True)
    inner = sch.get_loops(rf)[at:]            # lane, unit loops, k_outer (kept even when of one step)
    lane, k_outer = inner[0], inner[-1]
    sch.reorder(k_outer, lane)
    sch.vectorize(lane)
    sch.parallel(task)               # before the reductions are split into init and update blocks
    sch.decompose_reduction(rf, k_outer)
    if epi is not None:
        sch.reverse_compute_at(epi, task, preserve_unit_loops=True)


def column_tile(columns: int | None, lanes: int, cores: int) -> int:
    """Width of the column tiles: up to 4 vectors, narrowed while there are fewer than
    TASKS_PER_CORE tiles per core; ValueError when the columns are not a multiple of the lanes."""
    if columns is None or columns % lanes:
        raise ValueError(f"{columns} columns are not a multiple of {lanes} lanes")
    width = TILE_VECTORS * lanes
    while width > lanes and (columns % width or columns // width < TASKS_PER_CORE * cores):
        width //= 2
    return width


def full_tile_parts(columns: int | None, lanes: int, cores: int) -> int:
    """Parts each full-width tile must be split into (along the reduction) for every core to get
    TASKS_PER_CORE tasks; 1 where the tiles alone do or the columns are not whole tiles."""
    width = TILE_VECTORS * lanes
    if columns is None or columns % width:
        return 1
    return -(-TASKS_PER_CORE * cores // (columns // width))


def depth_splits(columns: int | None, depth: int | None, lanes: int, cores: int) -> int:
    """Parts the depth is split into (``full_tile_parts``), fewer where they would not keep
    K_UNROLL-row parts of at least MIN_SPLIT_ROWS rows."""
    if depth is None:
        return 1
    splits = full_tile_parts(columns, lanes, cores)
    while splits > 1 and (depth % (splits * K_UNROLL) or depth // splits < MIN_SPLIT_ROWS):
        splits -= 1
    return splits


def _schedule_column_product(sch: Schedule, mm: SBlockRV, info, lanes: int, cores: int) -> None:
    block = sch.get(mm)
    loops = sch.get_loops(mm)
    spatial = [p for p in range(len(loops)) if p != info.k]
    if info.k != len(loops) - 1 or info.j != spatial[-1]:
        raise ValueError("the column product needs (.., j, k) loops")
    columns = const_extent(block.iter_vars[info.j].dom.extent)
    depth = const_extent(block.iter_vars[info.k].dom.extent)
    splits = depth_splits(columns, depth, lanes, cores)
    if splits > 1:
        _schedule_split_product(sch, mm, splits, TILE_VECTORS * lanes, lanes)
        return
    width = column_tile(columns, lanes, cores)
    epi = _prologue.inline_around(sch, mm)
    loops = sch.get_loops(mm)
    jo, ji = sch.split(sch.fuse(*loops[:-1]), [None, width])
    k_loops = sch.split(loops[-1], [None, K_UNROLL]) if depth is not None and depth % K_UNROLL == 0 else [loops[-1]]
    sch.reorder(jo, *k_loops, ji)
    sch.vectorize(ji)
    if len(k_loops) == 2:
        sch.unroll(k_loops[1])
    store = sch.cache_write(mm, 0, "local")
    sch.reverse_compute_at(store, jo, preserve_unit_loops=True)
    sch.vectorize(sch.fuse(*sch.get_loops(store)[1:]))
    sch.parallel(jo)
    sch.decompose_reduction(mm, k_loops[0])
    if epi is not None:
        place_epilogue(sch, epi, jo, lanes)


def _schedule_split_product(sch: Schedule, mm: SBlockRV, splits: int, width: int, lanes: int) -> None:
    """The column product as ``splits`` depth parts per tile of ``width`` columns, then the sum of
    the parts (vectorized over the columns) with the epilogue."""
    epi = _prologue.inline_around(sch, mm)
    part_loop, _ = sch.split(sch.get_loops(mm)[-1], [splits, None])
    part = sch.rfactor(part_loop, factor_axis=0)
    *spatial, split, rows = sch.get_loops(part)
    jo, ji = sch.split(sch.fuse(*spatial), [None, width])
    ko, ki = sch.split(rows, [None, K_UNROLL])
    sch.reorder(split, jo, ko, ki, ji)
    task = sch.fuse(split, jo)
    store = sch.cache_write(part, 0, "local")
    sch.reverse_compute_at(store, task, preserve_unit_loops=True)
    sch.vectorize(sch.fuse(*sch.get_loops(store)[1:]))
    sch.vectorize(ji)
    sch.unroll(ki)
    sch.parallel(task)
    sch.decompose_reduction(part, ko)
    *spatial, parts = sch.get_loops(mm)
    co, ci = sch.split(sch.fuse(*spatial), [None, lanes])
    sch.reorder(co, parts, ci)
    sch.vectorize(ci)
    sch.decompose_reduction(mm, parts)
    if epi is not None:
        place_epilogue(sch, epi, co, lanes)


def place_epilogue(sch: Schedule, epi: SBlockRV, tile, lanes: int) -> None:
    """The epilogue under the column tile when it reads the tile's columns only, else its own
    parallel, vectorized loop nest."""
    try:
        sch.reverse_compute_at(epi, tile, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(epi)[-1])
    except Exception:  # pylint: disable=broad-except  # e.g. a reshape reading across tiles
        parallel_vectorize(sch, sch.get_loops(epi), lanes)

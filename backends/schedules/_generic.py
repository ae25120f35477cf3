"""Schedules for injective kernels and row reductions (softmax, norms, mean).

Injective: every block that can be inlined is inlined, then each remaining
block's loops are fused into one, split by the vector width, and run as
``parallel(outer) x vectorize(lanes)``.

Row kernels (softmax, layer / RMS norm: every reduction runs over the last
axis of the output): parallel rows, every stage computed per row, reductions
split into vector-wide partial sums (``schedule_rows``). Other reductions:
TVM's DLight CPU ``Reduction`` rule -- the leading rows are parallel, every
block is computed per row and injective blocks are vectorized.

Fallback: each block's leading spatial loops are fused and parallelized, and
an innermost spatial loop is vectorized; reduction loops stay serial.
"""

from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.dlight.cpu import Reduction
from tvm.target import Target

from ._analysis import const_extent, divisible, is_reduction, root_blocks

MIN_PARALLEL = 4096  # elements below which a kernel runs on one thread


def inline_all(sch: Schedule) -> None:
    """Inline every block that TVM allows to be inlined (repeat to fixpoint)."""
    changed = True
    while changed:
        changed = False
        for block in root_blocks(sch)[:-1]:
            if is_reduction(sch, block):
                continue
            try:
                sch.compute_inline(block)
                changed = True
            except Exception:  # pylint: disable=broad-except
                continue


def schedule_injective(sch: Schedule, lanes: int) -> None:
    """Fuse all loops of each remaining block; parallel outer, vector inner."""
    if any(is_reduction(sch, b) for b in root_blocks(sch)):
        raise ValueError("not an injective function")
    inline_all(sch)
    for block in root_blocks(sch):
        parallel_vectorize(sch, sch.get_loops(block), lanes)


def parallel_vectorize(sch: Schedule, loops, lanes: int) -> None:
    """Fuse ``loops`` (all spatial) and split them into parallel x vector."""
    if not loops:
        return
    if len(loops) > 1 and _symbolic_rows(sch, loops, lanes):
        sch.parallel(sch.fuse(*loops[:-1]))
        _, inner = sch.split(loops[-1], [None, lanes])
        sch.vectorize(inner)
        return
    fused = sch.fuse(*loops)
    total = const_extent(sch.get(fused).extent)
    if total is not None and total <= lanes:
        sch.vectorize(fused)
        return
    outer, inner = sch.split(fused, [None, lanes])
    if total is None or total >= MIN_PARALLEL:
        sch.parallel(outer)
    sch.vectorize(inner)


def _symbolic_rows(sch: Schedule, loops, lanes: int) -> bool:
    """A symbolic number of rows of a static, vector-aligned length (e.g. ``[1, 9, T, 64]``):
    the loops are then not fused across the row, whose flat index would be split back
    with divisions by the symbolic extent for every element."""
    extents = [sch.get(loop).extent for loop in loops]
    return divisible(extents[-1], lanes) and any(const_extent(e) is None for e in extents[:-1])


def schedule_row_reduction(sch: Schedule, target: Target) -> Schedule:
    """Softmax / layer norm / RMS norm / mean: DLight's CPU reduction rule, after
    inlining every element-wise stage that feeds a single consumer.

    Each stage left standing gets its own loop over the row; with a symbolic row
    length those loops are predicated and run scalar, so e.g. softmax's
    ``x - max`` is folded into its ``exp`` (read once per element) while
    ``exp`` itself, read by both the sum and the normalization, stays a stage."""
    inline_single_use(sch)
    result = Reduction().apply(sch.mod["main"], target, False)
    if result is None:
        raise ValueError("not a row reduction")
    return result


def inline_single_use(sch: Schedule) -> None:
    """Inline the non-output element-wise blocks that have exactly one consumer."""
    for block in root_blocks(sch)[:-1]:
        if is_reduction(sch, block) or len(sch.get_consumers(block)) != 1:
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # pylint: disable=broad-except
            continue


def schedule_rows(sch: Schedule, lanes: int) -> None:
    """Row-wise kernels: every reduction runs over the row of the output.

    Every reduction over the row (max, sum, sum of squares) is split into
    ``lanes`` partial results (``rfactor``), accumulated with one vector
    instruction per ``lanes`` elements and summed at the end, instead of one
    dependent scalar add per element. All stages are then computed per row,
    inside one parallel loop over the rows of the output; element-wise stages
    feeding a single consumer are inlined first. Only for a row length that is
    a static multiple of ``lanes``: with a predicated last chunk (a symbolic T)
    the rfactor-ed max of softmax came out wrong in TVM 0.27, so such rows go
    to ``schedule_row_reduction``."""
    inline_single_use(sch)
    out = root_blocks(sch)[-1]
    out_loops = sch.get_loops(out)
    length = sch.get(out_loops[-1]).extent
    if is_reduction(sch, out) or len(out_loops) < 2 or not divisible(length, lanes):
        raise ValueError("not a row kernel with a static row length")
    partials = [_rfactor_row(sch, block, length, lanes) for block in root_blocks(sch)[:-1] if is_reduction(sch, block)]
    if not partials:
        raise ValueError("no reduction over the row")
    rows = sch.fuse(*out_loops[:-1])
    _, vec = sch.split(out_loops[-1], [None, lanes])
    sch.vectorize(vec)
    for block in reversed(root_blocks(sch)[:-1]):
        sch.compute_at(block, rows, preserve_unit_loops=False)
    sch.parallel(rows)
    for partial in partials:
        lane, outer = sch.get_loops(partial)[-2:]
        sch.reorder(outer, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(partial, outer)


def _rfactor_row(sch: Schedule, block, length, lanes: int):
    """Split a reduction over the row into ``lanes`` partial sums; returns the
    block computing them."""
    loops = sch.get_loops(block)
    if const_extent(sch.get(loops[-1]).extent) != const_extent(length):
        raise ValueError("reduction over another axis than the row")
    _, lane = sch.split(loops[-1], [None, lanes])
    return sch.rfactor(lane, factor_axis=len(loops) - 1)


def schedule_fallback(sch: Schedule, lanes: int) -> None:
    """Parallelize leading spatial loops of every block (always valid)."""
    inline_all(sch)
    for block in root_blocks(sch):
        loops = sch.get_loops(block)
        kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
        if len(kinds) != len(loops):
            continue
        lead = 0
        while lead < len(kinds) and kinds[lead] == tirx.IterVar.DataPar:
            lead += 1
        if lead == len(loops):
            parallel_vectorize(sch, loops, lanes)
        elif lead > 0:
            sch.parallel(sch.fuse(*loops[:lead]))

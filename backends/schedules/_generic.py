"""Schedules for injective kernels and row reductions (softmax, norms, mean).

Injective: every block that can be inlined is inlined, then each remaining
block's loops are fused into one, split by the vector width, and run as
``parallel(outer) x vectorize(lanes)``.

Row reductions (all blocks share leading spatial axes, at least one block
reduces over the trailing axes): TVM's DLight CPU ``Reduction`` rule -- the
leading rows are parallel, every block is computed per row and injective
blocks are vectorized.

Fallback: each block's leading spatial loops are fused and parallelized, and
an innermost spatial loop is vectorized; reduction loops stay serial.
"""

from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.dlight.cpu import Reduction
from tvm.target import Target

from ._analysis import const_extent, is_reduction, root_blocks

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
        _parallel_vectorize(sch, sch.get_loops(block), lanes)


def _parallel_vectorize(sch: Schedule, loops, lanes: int) -> None:
    """Fuse ``loops`` (all spatial) and split them into parallel x vector."""
    if not loops:
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


def schedule_row_reduction(sch: Schedule, target: Target) -> Schedule:
    """Softmax / layer norm / RMS norm / mean: DLight's CPU reduction rule."""
    result = Reduction().apply(sch.mod["main"], target, False)
    if result is None:
        raise ValueError("not a row reduction")
    return result


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
            _parallel_vectorize(sch, loops, lanes)
        elif lead > 0:
            sch.parallel(sch.fuse(*loops[:lead]))

"""Prologue and epilogue blocks around a GEMM's contraction block.

An element-wise / layout prologue (rotary embedding, a GQA broadcast of K or V, a head
transpose) inlined into the matmul itself would be recomputed for every output that reads
it (N or M times), inside the micro kernel, with the index arithmetic of reshapes over
symbolic dims. Instead each computed operand is materialized once: the matmul's direct
producer block is kept, every block upstream of it is inlined into it, and it is then
moved into the operand copy the GEMM schedule makes anyway -- the zero-padded copy of
``pad_einsum`` (A, or B with a symbolic N) or the packed B panel. The epilogue chain is
folded into its last block, which stores each finished micro tile.
"""

from tvm.s_tir import Schedule
from tvm.s_tir.schedule import SBlockRV

from ._analysis import is_reduction, root_blocks


def inline_around(sch: Schedule, mm: SBlockRV) -> SBlockRV | None:
    """Inline prologue blocks into the matmul (prologue reductions stay loop nests of their own)
    and fold the epilogue chain into its last block. Returns the epilogue block (None when there
    is none)."""
    inline_before(sch, mm)
    return fold_epilogue(sch, mm)


def inline_before(sch: Schedule, target: SBlockRV, keep=lambda block: False) -> None:
    """Inline every block before ``target`` into its consumers, except reductions (which cannot
    be: they stay loop nests of their own, computed once) and the blocks ``keep`` names."""
    blocks = root_blocks(sch)
    for block in blocks[:position(sch, blocks, target)]:
        if not keep(block) and not is_reduction(sch, block):
            sch.compute_inline(block)


def position(sch: Schedule, blocks: list, block: SBlockRV) -> int:
    """Index of ``block`` in ``blocks``."""
    return [n for n, b in enumerate(blocks) if sch.get(b).same_as(sch.get(block))][0]


def fold_epilogue(sch: Schedule, mm: SBlockRV) -> SBlockRV | None:
    """Inline every block after the matmul into the last one; returns it (or None)."""
    blocks = root_blocks(sch)
    after = blocks[position(sch, blocks, mm) + 1 :]
    for block in after[:-1]:
        sch.compute_inline(block)
    return after[-1] if after else None


def materialize_operands(sch: Schedule, mm: SBlockRV) -> list:
    """Keep the matmul's direct producer blocks (one per computed operand) and inline every
    other prologue block into its consumers, so each operand is one element-wise block.
    A prologue reduction (the per-block maxima of ``dynamic_quantize``) cannot be inlined: it
    stays a loop nest of its own before the product, computed once.
    Returns the kept blocks; ``inline_into_copies`` / ``fill_pack`` later move them into
    the operand copies."""
    operands = list(sch.get_producers(mm))
    inline_before(sch, mm, keep=lambda block: any(sch.get(block).same_as(sch.get(op)) for op in operands))
    return operands

def inline_into_copies(sch: Schedule, mm: SBlockRV, operands: list) -> None:
    """Move each computed operand into the zero-padded copy ``pad_einsum`` made of it,
    so the prologue runs once per element while the operand is copied anyway."""
    for block in operands:
        if not any(sch.get(c).same_as(sch.get(mm)) for c in sch.get_consumers(block)):
            sch.compute_inline(block)


def fill_pack(sch: Schedule, packed: SBlockRV, copies: list) -> list:
    """Compute B's producer (a computed operand block) straight into the packed panel, once
    per panel; returns ``copies`` without it. Not for B's zero-padded copy (a symbolic N):
    its lane-dependent bound check would make the panel copy scalar."""
    producers = list(sch.get_producers(packed))
    if len(producers) != 1:
        return copies
    rest = [c for c in copies if not sch.get(c).same_as(sch.get(producers[0]))]
    try:
        sch.compute_inline(producers[0])
    except Exception:  # pylint: disable=broad-except
        return copies
    return rest

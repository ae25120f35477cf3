"""Block analysis and staging shared by slimgraph's CUDA product rules (``ColumnGEMV`` and
``RowGEMV``): the blocks of a product kernel, which reads depend on the output, and the
activation row copied to shared memory once per thread block."""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr, normalize_prim_func
from tvm.s_tir.dlight.base.common_schedules import try_inline_contiguous_spatial
from tvm.target import Target

VECTOR_BYTES = 16                  # the widest load of one thread (ld.global.v4)


def static_extent(extent) -> int | None:
    return int(extent) if isinstance(extent, (int, tirx.IntImm)) else None


def weight_reads(block: s_tir.SBlock, n_var: tirx.Var) -> list[int]:
    """Indices (in ``block.reads``) of the reads that depend on the output ``n``: the weight, its
    scales and zero points."""
    return [i for i, read in enumerate(block.reads)
            if any(n_var in collect_vars_used_in_prim_expr(axis.min) for axis in read.region)]


@dataclass
class ProductBlocks:
    sch: s_tir.Schedule
    infos: list                  # the product block, then its epilogue block if any
    row_reductions: list = field(default_factory=list)   # reductions to one value before the product


def _reduces_to_one_value(info) -> bool:
    return info.is_reduction() and all(static_extent(it.dom) == 1 for it in info.iters if it.kind == "S")


def product_blocks(func: tirx.PrimFunc, target: Target, *, keep: str | None = None,
                   row_reductions: bool = False) -> ProductBlocks | None:
    """The blocks of a CUDA kernel whose spatial prologue inlines into one reduction followed by at
    most one injective block; None for other kernels. Blocks annotated ``keep`` stay blocks of their
    own (stages the rule places itself); with ``row_reductions``, reductions of the whole row to one
    value may come first (an RMS norm's sum of squares, ``gpu_norm_prologue``)."""
    if target.kind.name != "cuda":
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is not None and keep is not None:
        infos = [info for info in infos if keep not in sch.get(info.block_rv).annotations]
    infos = try_inline_contiguous_spatial(sch, infos)
    reductions = []
    while row_reductions and infos is not None and len(infos) > 1 and _reduces_to_one_value(infos[0]):
        reductions.append(infos.pop(0))
    if infos is None or len(infos) not in (1, 2) or (len(infos) == 2 and not infos[1].is_injective()):
        return None
    return ProductBlocks(sch, infos, reductions)


def activation_reads(sch: s_tir.Schedule, partial, weights: list) -> list[int]:
    """Indices of the reads of ``partial`` that are neither ``weights`` buffers nor its own output
    (taken before any read is cached, which renames the cached reads)."""
    skipped = [*weights, *(write.source for write in sch.get(partial).writes)]
    return [i for i, read in enumerate(sch.get(partial).reads) if not any(read.source.same_as(b) for b in skipped)]


def stage_in_shared(sch: s_tir.Schedule, partial, indices: list[int], bx, threads_y: int, threads_x: int) -> None:
    """Copy the reads ``indices`` of ``partial`` (activations: all of their K values) to shared
    memory once per block (loop ``bx``), 16 bytes per thread and step over ``threads_y`` x
    ``threads_x`` threads."""
    for index in indices:
        cache = sch.cache_read(partial, index, "shared")
        sch.compute_at(cache, bx, preserve_unit_loops=True)
        lanes = VECTOR_BYTES // (tvm.DataType(sch.get(cache).writes[0].source.dtype).bits // 8)
        _, group, lane, vec = sch.split(sch.fuse(*sch.get_loops(cache)[1:]), [None, threads_y, threads_x, lanes])
        sch.bind(group, "threadIdx.y")
        sch.bind(lane, "threadIdx.x")
        sch.vectorize(vec)

"""One CUDA kernel for a chain of per-row values broadcast over the rows of a last block.

A one-token step without a cache attends over a single key, so its fused ``softmax -> cast -> mul``
kernel is, per head ``h``,

    m[h] = max_j s[h, j],   e[h] = sum_j exp(s[h, j] - m[h]),   out[h, d] = exp(s[h, 0] - m[h]) / e[h] * v[h, d]

with ``j`` running over one key. DLight's normalization drops loops of extent 1, so the reductions
look spatial, ``GeneralReduction`` finds no reduction to schedule, and ``Fallback`` gives every
block a kernel of its own: three launches, each a few microseconds of a step that reads 32 floats.

``RowChain`` takes kernels whose blocks are all spatial (after inlining what inlines), where every
block but the last computes values over the same leading dims ``P`` as the last block's first loops:
one thread block per row of ``P`` (``blockIdx.x``), the last block's remaining loops on the threads
(``threadIdx.x``, at most 1024), and every earlier block computed at the row loop into registers by
each thread (a few loads per thread; the values are per row, so no thread waits for another).
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base.common_schedules import try_inline_contiguous_spatial
from tvm.target import Target

MAX_THREADS = 1024


def _extents(sch: s_tir.Schedule, loops) -> list[int] | None:
    extents = [sch.get(loop).extent for loop in loops]
    return [int(e) for e in extents] if all(isinstance(e, tirx.IntImm) for e in extents) else None


class RowChain:
    """Kernels of per-row blocks followed by a block broadcasting them over its rows (see above)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if target.kind.name != "cuda":
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if infos is None or len(infos) < 2 or any("R" in info.dom_kind() for info in infos):
            return None
        *rows, last = infos
        row_extents = [_extents(sch, sch.get_loops(info.block_rv)) for info in rows]
        loops = sch.get_loops(last.block_rv)
        extents = _extents(sch, loops)
        first = row_extents[0]
        if extents is None or first is None or any(e != first for e in row_extents):
            return None
        lead = len(first)
        if not 0 < lead < len(extents) or extents[:lead] != first or math.prod(extents[lead:]) > MAX_THREADS:
            return None
        row = sch.fuse(*loops[:lead])
        threads = sch.fuse(*loops[lead:])
        sch.bind(row, "blockIdx.x")
        sch.bind(threads, "threadIdx.x")
        for info in reversed(rows):
            sch.compute_at(info.block_rv, row, preserve_unit_loops=True)
            sch.set_scope(info.block_rv, 0, "local")
        return sch

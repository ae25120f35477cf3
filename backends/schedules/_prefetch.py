"""Software prefetch of the next task's weights in the low-bit one-row products (CPUs).

A one-row product over packed low-bit words (``_quantized_gemv``, and its integer form over 8-bit
activation codes, ``_integer_gemv``) reads every word once, one tile of columns per parallel task.
The tiles of one core follow each other in memory (column panels, ``pack_weights``), but the
hardware prefetchers follow a stream only within a 4 KB page and start over at every page
boundary, and the dequantizing loop (a mask, a conversion and a multiply-add a code) asks for the
next line too late to hide those restarts. So, at every word row ``r`` of task ``t``, the kernel
prefetches row ``r`` of task ``t + 1`` into L2, one prefetch per 64-byte line::

    for t in parallel(tasks):
        for r in rows:                                  # the loop over word rows
            prefetch(&W[index(min(t + 1, tasks - 1), r, lane = 16 l)])  for l < lanes / 16
            ... the row's multiply-adds, W[index(t, r, lane)] ...

``index`` is the read of the words by the block inside the row loop (the product's loop nest, or
the block of the integer kernel's tensor intrinsic), its iterators bound as the loops bind them,
with the task moved one ahead (clamped at the last) and every loop inside the row loop at 0. The
line offsets step the last (contiguous) index, along which a tile's columns lie in both the packed
and the row-major layout, over as many elements as the row's loops read along it. A prefetch never
faults, so the clamp only keeps the address in the buffer.

``bench/stage3_x86.py measure`` builds SmolLM2's int4 decoding step with and without the prefetch
(``PREFETCH_TASKS_AHEAD = 0``) and times both. Float32 one-row products (``_gemv``) do not get it:
their loads come fast enough for the prefetchers, and the extra instructions made them slower.

TVM 0.27 has no Python TIR mutator; ``_insert_at_body_start`` rebuilds the loops and blocks on the
path to the row loop with their constructors and leaves every other statement as it is.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import LoopRV

LINE_BYTES = 64          # cache line of the x86 and ARM cores slimgraph targets
LOCALITY_L2 = 2          # llvm.prefetch locality 2: x86 prefetcht1 (into L2), AArch64 PLDL2KEEP


def prefetch_next_task(sch: Schedule, task: LoopRV, row: LoopRV, buffer: tirx.Buffer,
                       ahead: int = 1) -> tirx.PrimFunc:
    """The scheduled function with the prefetch above (``ahead`` tasks on) inserted at the start of
    ``row``'s body. The addresses follow the block inside ``row`` that reads ``buffer`` (a loop nest
    or a tensor intrinsic's block); ``row`` runs inside the parallel ``task`` loop. Raises where the
    read cannot be followed (a block that does not read it, a row of symbolic length)."""
    func = sch.mod["main"]
    task_loop, row_loop = sch.get(task), sch.get(row)
    realize = _reader(row_loop.body, buffer)
    if realize is None:
        raise ValueError(f"nothing inside the row loop reads {buffer.name}")
    read, last_extent = _bound_read(realize, buffer)
    inner = _loops(row_loop.body)
    line = tirx.Var("prefetch_line", "int64")
    address = _task_ahead_index(read, task_loop, ahead, [loop.loop_var for loop in inner], line, buffer)
    call = tirx.call_llvm_intrin("void", "llvm.prefetch.p0", tirx.address_of(tirx.BufferLoad(buffer, address)),
                                 tirx.const(0, "uint32"), tirx.const(LOCALITY_L2, "uint32"),
                                 tirx.const(1, "uint32"))
    row_bytes = _row_elements(read[-1], last_extent, inner, _loops(func.body)) * (buffer.dtype.bits // 8)
    prefetch = tirx.For(line, tirx.const(0, "int64"), tirx.const(max(1, row_bytes // LINE_BYTES), "int64"),
                        tirx.ForKind.UNROLLED, tirx.Evaluate(call))
    return func.with_body(_insert_at_body_start(func.body, row_loop.loop_var, prefetch))


def _bound_read(realize, buffer: tirx.Buffer) -> tuple[list, int]:
    """The first indices of the region of ``buffer`` the block of ``realize`` reads, over the loops
    that bind its iterators, and the region's extent along the last index."""
    region = next(r for r in realize.block.reads if r.source.same_as(buffer))
    bindings = {iv.var: value for iv, value in zip(realize.block.iter_vars, realize.iter_values)}
    return substitute([r.min for r in region.region], bindings), int(region.region[-1].extent)


def _task_ahead_index(read: list, task_loop: tirx.For, ahead: int, inner: list, line: tirx.Var,
                      buffer: tirx.Buffer) -> list:
    """``read`` ``ahead`` tasks on (clamped at the last task) at the start of the row (the ``inner``
    loop variables at 0), plus ``line`` cache lines along the last index."""
    task = task_loop.loop_var
    later = tirx.min(task + ahead, task_loop.min + task_loop.extent - 1)
    index = substitute(read, {task: later, **{v: tirx.const(0, str(v.ty)) for v in inner}})
    index[-1] = index[-1] + line * (LINE_BYTES // (buffer.dtype.bits // 8))
    return index


def _row_elements(last_index, extent: int, inner: list, loops: list) -> int:
    """Elements along the last index one row step reads: from the ``inner`` loops at their first
    values to their last ones, plus the block's own extent (every other loop at its first value)."""
    first = {loop.loop_var: loop.min for loop in loops}
    last = {**first, **{loop.loop_var: loop.min + loop.extent - 1 for loop in inner}}
    (low,), (high,) = (substitute([last_index], values) for values in (first, last))
    return int(high) - int(low) + extent


def substitute(exprs: list, values: dict) -> list:
    """``exprs`` with each variable of ``values`` replaced by its value, simplified (integers where
    every variable is bound)."""
    return list(tirx.IndexMap(list(values), list(exprs), None).map_indices(list(values.values())))


def _loops(stmt) -> list:
    """Every loop inside ``stmt`` (blocks included), outermost first."""
    return [s for s in statements(stmt) if isinstance(s, tirx.For)]


def _reader(stmt, buffer: tirx.Buffer):
    """The first block realize inside ``stmt`` whose block reads ``buffer`` (None if there is none)."""
    return next((s for s in statements(stmt) if isinstance(s, s_tir.SBlockRealize)
                 and any(r.source.same_as(buffer) for r in s.block.reads)), None)


def statements(stmt):
    """``stmt`` and every statement inside it (loops, sequences, blocks, branches), depth first."""
    yield stmt
    for child in _children(stmt):
        yield from statements(child)


def _children(stmt) -> list:
    if isinstance(stmt, tirx.For):
        return [stmt.body]
    if isinstance(stmt, tirx.SeqStmt):
        return list(stmt.seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        return [stmt.block]
    if isinstance(stmt, s_tir.SBlock):
        return [stmt.body] + ([stmt.init] if stmt.init is not None else [])
    if isinstance(stmt, tirx.IfThenElse):
        return [stmt.then_case] + ([stmt.else_case] if stmt.else_case is not None else [])
    return []


def _insert_at_body_start(stmt, loop_var: tirx.Var, first):
    """``stmt`` with ``first`` put before the body of the loop over ``loop_var``; the statements on
    the path to it are rebuilt, all others kept (returned as they are when the loop is not inside)."""
    if isinstance(stmt, tirx.For):
        if stmt.loop_var.same_as(loop_var):
            body = tirx.SeqStmt([first, stmt.body])
        else:
            body = _insert_at_body_start(stmt.body, loop_var, first)
            if body.same_as(stmt.body):
                return stmt
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                        stmt.annotations, stmt.step, stmt.span)
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_insert_at_body_start(s, loop_var, first) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq, stmt.span)
    if isinstance(stmt, s_tir.SBlockRealize):
        block = _insert_at_body_start(stmt.block, loop_var, first)
        return stmt if block.same_as(stmt.block) else s_tir.SBlockRealize(
            list(stmt.iter_values), stmt.predicate, block, stmt.span)
    if isinstance(stmt, s_tir.SBlock):
        body = _insert_at_body_start(stmt.body, loop_var, first)
        return stmt if body.same_as(stmt.body) else s_tir.SBlock(
            list(stmt.iter_vars), list(stmt.reads), list(stmt.writes), stmt.name_hint, body, stmt.init,
            list(stmt.alloc_buffers), list(stmt.match_buffers), stmt.annotations, stmt.span)
    if isinstance(stmt, tirx.IfThenElse):
        then_case = _insert_at_body_start(stmt.then_case, loop_var, first)
        else_case = (_insert_at_body_start(stmt.else_case, loop_var, first)
                     if stmt.else_case is not None else None)
        unchanged = then_case.same_as(stmt.then_case) and (else_case is None or else_case.same_as(stmt.else_case))
        return stmt if unchanged else tirx.IfThenElse(stmt.condition, then_case, else_case, stmt.span)
    return stmt

"""Structural analysis of TIR blocks used by the CPU schedule rules.

Kernels are classified from their block structure, never from names:

* a *contraction* block has reduction iterators and an update of the form
  ``C[..] = C[..] + A[..] * B[..]`` (casts allowed) -- matmul, batch matmul,
  GEMV;
* a *reduction* block is any other block with a reduction iterator (sum, max,
  mean, variance ...);
* everything else is *injective*.
"""

from dataclasses import dataclass

from tvm import tirx
from tvm.ir import TensorLoad
from tvm.s_tir import SBlock, Schedule
from tvm.s_tir.schedule import SBlockRV


@dataclass
class Contraction:
    """Roles of the iterators of a contraction ``C[b.., i, j] += A[b.., i, k] * B[b.., j/k]``.

    ``batch``/``i``/``j``/``k`` are positions in the block's iterator list;
    ``a_index``/``b_index`` are the read-buffer indices of the two operands in
    ``block.reads``; ``b_k_contiguous`` tells whether the reduction axis is the
    innermost axis of B (the ``x @ W^T`` layout of a torch Linear weight).
    """

    batch: list
    i: int | None
    j: int
    k: int
    a_index: int
    b_index: int
    b_k_contiguous: bool


def root_blocks(sch: Schedule) -> list[SBlockRV]:
    """Child blocks of the PrimFunc's root block, in program order."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def is_reduction(sch: Schedule, block: SBlockRV) -> bool:
    """True when the block has a commutative-reduction iterator."""
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def const_extent(expr) -> int | None:
    """The integer value of an extent, or None when it is symbolic."""
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def divisible(extent, factor: int) -> bool:
    """True when the extent is a constant multiple of ``factor``."""
    value = const_extent(extent)
    return value is not None and value % factor == 0


def _strip_cast(expr):
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr


def _index_vars(load: TensorLoad) -> list:
    """For each index of a load, the block iterator var it is, or None."""
    return [idx if isinstance(idx, tirx.Var) else None for idx in load.indices]


def _contains(var_list, var) -> bool:
    return any(v is not None and v.same_as(var) for v in var_list)


def _mul_operands(block: SBlock):
    """The two BufferLoads of ``C = C + A * B``, or None."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return None
    lhs, rhs = store.value.a, store.value.b
    if isinstance(rhs, TensorLoad) and rhs.source.same_as(store.buffer):
        lhs, rhs = rhs, lhs
    if not (isinstance(lhs, TensorLoad) and lhs.source.same_as(store.buffer)):
        return None
    rhs = _strip_cast(rhs)
    if not isinstance(rhs, tirx.Mul):
        return None
    a, b = _strip_cast(rhs.a), _strip_cast(rhs.b)
    if isinstance(a, TensorLoad) and isinstance(b, TensorLoad):
        return store, a, b
    return None


def _read_index(block: SBlock, buf) -> int | None:
    for n, region in enumerate(block.reads):
        if region.source.same_as(buf):
            return n
    return None


def analyze_contraction(block: SBlock) -> Contraction | None:
    """Recognize a matmul-like block; return its iterator roles or None."""
    ops = _mul_operands(block)
    if ops is None or block.init is None:
        return None
    store, a, b = ops
    ivars = [iv.var for iv in block.iter_vars]
    red = [n for n, iv in enumerate(block.iter_vars) if iv.iter_type == tirx.IterVar.CommReduce]
    if len(red) != 1:
        return None
    k_var = ivars[red[0]]
    out_vars = _index_vars(store)
    if any(v is None for v in out_vars) or len(out_vars) < 1:
        return None
    a_vars, b_vars = _index_vars(a), _index_vars(b)
    if not (_contains(a_vars, k_var) and _contains(b_vars, k_var)):
        return None
    if _contains(a_vars, out_vars[-1]) and not _contains(b_vars, out_vars[-1]):
        a, b, a_vars, b_vars = b, a, b_vars, a_vars
    j_var = out_vars[-1]
    if not _contains(b_vars, j_var) or _contains(a_vars, j_var):
        return None
    i_var = out_vars[-2] if len(out_vars) >= 2 else None
    if i_var is not None and (not _contains(a_vars, i_var) or _contains(b_vars, i_var)):
        i_var = None
    n_lead = len(out_vars) - (2 if i_var is not None else 1)

    def index(var) -> int:
        return next(n for n, v in enumerate(ivars) if v.same_as(var))

    a_idx, b_idx = _read_index(block, a.source), _read_index(block, b.source)
    if a_idx is None or b_idx is None or a_idx == b_idx:
        return None
    return Contraction(
        batch=[index(v) for v in out_vars[:n_lead]],
        i=None if i_var is None else index(i_var),
        j=index(j_var),
        k=red[0],
        a_index=a_idx,
        b_index=b_idx,
        b_k_contiguous=b_vars[-1] is not None and b_vars[-1].same_as(k_var),
    )

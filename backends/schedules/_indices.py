"""Fold the index arithmetic that reshapes leave over symbolic dims.

Legalized reshapes address their input through the flat offset, e.g. a
``[1, 9, T, 64]`` view of a ``[1, 3, 1, T, 64]`` tensor reads::

    x[0, (h * T + t) // T // 3, (h * T + t) % T, d]

With a static T the simplifier reduces this to ``x[0, h // 3, t, d]``; with a
symbolic T it cannot, because ``t // T == 0`` needs the fact ``0 <= t < T``,
and every element then pays a few 64-bit divisions (LLVM also gives up
vectorizing such loops). ``simplify_indices`` rewrites each
``x // d`` and ``x % d`` with a non-constant divisor: ``x`` is split into the
terms that are multiples of ``d`` (``q * d``) and the rest ``r``; when the
iterator ranges of the enclosing loops and blocks prove ``0 <= r < d``,
``x // d = q`` and ``x % d = r``. Remaining constant divisions by a dim of the
head count (``h % 9 // 3``) are simplified with the same ranges.
"""

import tvm_ffi
from tvm import ir, sym, tirx
from tvm.s_tir import SBlock


def _iterator_ranges(func: tirx.PrimFunc) -> sym.Analyzer:
    """An analyzer that knows the range of every loop and block iterator of ``func``."""
    analyzer = sym.Analyzer()

    def bind_block(block: SBlock) -> SBlock:
        for iv in block.iter_vars:
            analyzer.bind(iv.var, iv.dom)
        return block

    def bind_loop(loop: tirx.For) -> tirx.For:
        analyzer.bind(loop.loop_var, ir.Range.from_min_extent(loop.min, loop.extent))
        return loop

    tvm_ffi.structural_map(func.body, [(SBlock, bind_block), (tirx.For, bind_loop)], order="pre")
    return analyzer


def _terms(expr) -> list:
    """The summands of a (nested) addition."""
    if isinstance(expr, tirx.Add):
        return _terms(expr.a) + _terms(expr.b)
    return [expr]


def _sum(terms: list, dtype: str):
    total = tirx.IntImm(dtype, 0)
    for term in terms:
        total = total + term
    return total


def _fold_division(analyzer: sym.Analyzer, node):
    """``x // d`` or ``x % d`` without the division when ``x = q * d + r`` with ``0 <= r < d``."""
    divisor, dtype = node.b, str(node.ty.dtype)
    if isinstance(divisor, tirx.IntImm):
        simpler = analyzer.simplify(node)
        return simpler if isinstance(simpler, (tirx.IntImm, tirx.Var)) else node
    quotient, rest = [], []
    for term in _terms(analyzer.simplify(node.a)):
        if analyzer.can_prove_equal(tirx.floormod(term, divisor), tirx.IntImm(dtype, 0)):
            quotient.append(analyzer.simplify(tirx.floordiv(term, divisor)))
        else:
            rest.append(term)
    remainder = _sum(rest, dtype)
    if not (analyzer.can_prove(remainder >= 0) and analyzer.can_prove(remainder < divisor)):
        return node
    return analyzer.simplify(_sum(quotient, dtype) if isinstance(node, tirx.FloorDiv) else remainder)


def simplify_indices(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with the divisions of its index expressions folded where the iterator ranges allow."""
    analyzer = _iterator_ranges(func)
    body = tvm_ffi.structural_map(
        func.body, [((tirx.FloorDiv, tirx.FloorMod), lambda node: _fold_division(analyzer, node))], order="post"
    )
    return func.with_body(body)

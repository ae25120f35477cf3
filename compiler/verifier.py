"""Structural verifier: SSA, defined-before-use (so no cycles), type consistency, calls, weights.

Every node's stored type is re-inferred from its inputs; a mismatch names the node. Errors are
collected and reported together (at most the first 20) so a broken frontend or pass is easy to fix.
"""

from __future__ import annotations

from slimgraph.compiler.errors import GraphStructureError, ShapeMismatchError
from slimgraph.compiler.ir import Function, Module
from slimgraph.compiler.ops import CALL
from slimgraph.compiler.types import TensorType


def _check_function(module: Module, fn: Function, problems: list[str], shape_problems: list[str]) -> None:
    defined: dict[str, TensorType] = {}
    later = {n.name for n in fn.nodes}
    for p in fn.params:
        if p.name in defined:
            problems.append(f"@{fn.name}: param %{p.name} defined twice")
        defined[p.name] = p.type
    for node in fn.nodes:
        where = f"@{fn.name} node %{node.name} ({node.op.name})"
        if node.name in defined:
            problems.append(f"{where}: value defined twice (not SSA)")
        in_types = []
        for ref in node.inputs:
            if ref.startswith("@"):
                w = module.weights.get(ref[1:])
                if w is None:
                    problems.append(f"{where}: uses unknown weight {ref}")
                    continue
                in_types.append(w.type)
            elif ref in defined:
                in_types.append(defined[ref])
            elif ref in later:
                problems.append(f"{where}: uses %{ref} before its definition (cycle or misordered graph)")
            else:
                problems.append(f"{where}: uses undefined value %{ref}")
        if len(in_types) == len(node.inputs):
            _check_type(module, node, in_types, where, problems, shape_problems)
        defined[node.name] = node.type
    for out in fn.outputs:
        if out not in defined:
            problems.append(f"@{fn.name}: output %{out} is not defined")


def _check_type(module, node, in_types, where, problems, shape_problems) -> None:
    if not node.op.check_arity(len(in_types)):
        problems.append(f"{where}: wrong number of inputs ({len(in_types)})")
        return
    if node.op is CALL:
        callee = module.functions.get(node.callee)
        if callee is None:
            problems.append(f"{where}: calls unknown function @{node.callee}")
            return
        want = tuple(p.type for p in callee.params)
        if tuple(in_types) != want:
            shape_problems.append(f"{where}: call arguments {[str(t) for t in in_types]} do not match "
                                  f"@{callee.name}{[str(t) for t in want]}")
        if callee.output_types()[:1] != (node.type,):
            shape_problems.append(f"{where}: result type {node.type} differs from @{callee.name}'s")
        return
    try:
        inferred = node.op.infer(in_types, node.attrs)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        shape_problems.append(f"{where}: {exc}")
        return
    if inferred != node.type:
        shape_problems.append(f"{where}: stored type {node.type} but inputs give {inferred}")


def verify(module: Module, *, source: str = "module") -> None:
    """Raise GraphStructureError / ShapeMismatchError listing what is wrong; return None if valid."""
    problems: list[str] = []
    shape_problems: list[str] = []
    if not module.entries:
        problems.append("module has no entry function")
    for fn in module.functions.values():
        _check_function(module, fn, problems, shape_problems)
    if problems:
        raise GraphStructureError(_summary(source, problems + shape_problems))
    if shape_problems:
        raise ShapeMismatchError(_summary(source, shape_problems))


def _summary(source: str, problems: list[str]) -> str:
    shown = problems[:20]
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return f"{source}: invalid graph:\n  " + "\n  ".join(shown) + more

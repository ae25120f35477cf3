"""Dead-code elimination.

A value is *live* when an output of its function depends on it. Liveness is computed backwards:
outputs are live, and every input of a live node is live; impure nodes are always live. Nodes
that are not live are dropped. Then functions not reachable from an entry through ``call`` nodes
are dropped, and finally weights that no remaining node references.
"""

from __future__ import annotations

from slimgraph.compiler.ir import Function, FunctionKind, Module
from slimgraph.compiler.passmanager import PassResult, register_pass


def live_nodes(fn: Function) -> Function:
    """``fn`` without the nodes no output depends on (impure nodes are kept)."""
    live = set(fn.outputs)
    kept = []
    for node in reversed(fn.nodes):
        if node.name in live or not node.op.pure:
            kept.append(node)
            live.update(i for i in node.inputs if not i.startswith("@"))
    if len(kept) == len(fn.nodes):
        return fn
    return Function(fn.name, fn.params, tuple(reversed(kept)), fn.outputs, fn.kind)


def reachable_functions(module: Module, functions: dict[str, Function]) -> set[str]:
    """Names of entry functions and of every function they (transitively) call."""
    todo = [f.name for f in functions.values() if f.kind is FunctionKind.ENTRY]
    seen = set(todo)
    while todo:
        for node in functions[todo.pop()].nodes:
            if node.callee is not None and node.callee not in seen:
                seen.add(node.callee)
                todo.append(node.callee)
    return seen


@register_pass("dce")
def dead_code_elimination(module: Module) -> PassResult:
    """Remove nodes no output depends on, fused functions nobody calls and unreferenced weights."""
    functions = {name: live_nodes(fn) for name, fn in module.functions.items()}
    nodes_removed = module.num_nodes() - sum(len(f.nodes) for f in functions.values())
    reachable = reachable_functions(module, functions)
    functions = {name: fn for name, fn in functions.items() if name in reachable}
    used = set()
    for fn in functions.values():
        used |= fn.weight_refs()
    weights = {name: w for name, w in module.weights.items() if name in used}
    stats = {
        "nodes_removed": nodes_removed,
        "functions_removed": len(module.functions) - len(functions),
        "weights_removed": len(module.weights) - len(weights),
    }
    if not any(stats.values()):
        return PassResult(module, False, stats)
    return PassResult(Module(functions, weights, module.metadata), True, stats)

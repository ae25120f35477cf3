"""The compression steps of a recipe as configured passes, in the order prune -> structured ->
lowrank -> quantize, each a :class:`~slimgraph.compiler.passmanager.PassInfo` the pass manager
runs like any other pass (dumps, ``--print-after``, ``--verify`` and the report included).

They run on the cleaned-up module (constants folded, ``x @ W.T`` pre-transposed, duplicates
merged, dead code removed), where every linear layer is ``matmul(x, @W)``; simplify, fusion and
dead-code elimination run after them.
"""

from __future__ import annotations

import importlib

from slimgraph.compiler.ir import Module
from slimgraph.compiler.passmanager import PassInfo, PassResult
from slimgraph.passes._compress import CompressionContext
from slimgraph.passes._linear import find_linear_layers

CLEANUP = ("fold_constants", "simplify", "cse", "dce")
FINISH = ("simplify", "merge_parallel_products", "fuse", "dce")

_FACTORIES = {
    "prune": ("slimgraph.passes.prune", "prune_pass"),
    "structured": ("slimgraph.passes.prune_structured", "structured_pass"),
    "lowrank": ("slimgraph.passes.lowrank", "lowrank_pass"),
    "quantize": ("slimgraph.passes.quantize", "quantize_pass"),
}
"""step name -> (module, factory(context) -> PassInfo)"""


def _check_rules(context: CompressionContext) -> PassInfo:
    def check(module: Module) -> PassResult:
        layers = find_linear_layers(module)
        context.recipe.check_rules([layer.name for layer in layers] + [layer.weight for layer in layers])
        return PassResult(module, False, {"linear_layers": len(layers)})

    return PassInfo("check_recipe", check, "Check that every recipe rule names layers of the model.")


def compression_passes(context: CompressionContext) -> list[PassInfo]:
    """The recipe's steps as passes (empty when the recipe asks for nothing)."""
    if context.recipe.empty:
        return []
    steps = []
    for step in context.recipe.step_names():
        module_name, factory = _FACTORIES[step]
        steps.append(getattr(importlib.import_module(module_name), factory)(context))
    return [_check_rules(context)] + steps


def compression_pipeline(context: CompressionContext) -> list:
    """Cleanup, the compression steps, then the rest of the default pipeline."""
    return [*CLEANUP, *compression_passes(context), *FINISH]

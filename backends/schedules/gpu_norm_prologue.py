"""CUDA one-token steps: an RMS norm computed inside the factored product that reads it.

In a LLaMA decoding step each RMS norm feeds exactly one weight product (the merged q/k/v, the
merged gate/up, the LM head), ``y = (rms_norm(h) -> f16) @ W`` with

    rms_norm(h)[k] = h[k] * rsqrt(sum_j h[j]^2 / K + eps) * gamma[k].

As separate kernels the norm costs a launch, a write of the normalized row and its read by the
product, for a row of only K values. A one-token product scheduled by ``RowGEMV`` over the factored
kernel (``gpu_factored_gemv``) reads the whole row into shared memory in every thread block
anyway, so each block can sum the squares itself (its threads split the K values, then one
block-wide sum) and normalize while it stages ``xq`` and ``xs``: K more multiply-adds a block
against the ``4 W K / 8`` bytes of words its ``W`` warps stream, and one kernel fewer a norm.
The values are those of the two kernels: the norm is still rounded to float16 where it was.

``merge_norms_into_row_products_pass`` (CUDA lowering with ``factored_rows``, first of the lowering
passes) merges the Relax function of such a norm into the function of the product that is its only
reader, where the product is one the factored kernel will take (``factorable_product``); ``RowGEMV``
schedules the norm's sum of squares as a block-wide reduction before the stages.

Measured slower (H100, ``bench/results/stage3-cuda-2026-12-08-run3-factored``): the norm adds a
second pass over the row and two barriers to every block's prologue; the merged gate/up product of
a 1.1B LLaMA took 24.2 us (15.8 with 8 warps a block) against 15.1 us for the factored product
alone and 1.7 us for the norm kernel it replaces. Off unless ``factored_rows`` is asked for.
"""

from __future__ import annotations

import tvm
from tvm import relax

from slimgraph.backends.schedules._quantized_gemv import is_primitive
from slimgraph.backends.schedules.gpu_factored_gemv import factorable_product


def _primitive(mod: tvm.IRModule, expr) -> relax.Function | None:
    """The Primitive function a call's operator ``expr`` names, else None."""
    if not isinstance(expr, relax.GlobalVar) or expr not in mod:
        return None
    return mod[expr] if is_primitive(mod[expr]) else None


def _single_block(func: relax.Function) -> relax.DataflowBlock | None:
    blocks = func.body.blocks
    return blocks[0] if len(blocks) == 1 and isinstance(blocks[0], relax.DataflowBlock) else None


def _is_rms_norm(func: relax.Function) -> bool:
    """A function of one dataflow block computing an RMS norm (with casts around it), returning one
    tensor."""
    block = _single_block(func)
    rms = tvm.ir.Op.get("relax.nn.rms_norm")
    return (block is not None and isinstance(func.body.body, relax.Var)
            and any(isinstance(b.value, relax.Call) and b.value.op == rms for b in block.bindings))


class _Bindings:
    """The binding lookups of one function, as ``factorable_product`` asks a rewriter for them."""

    def __init__(self, mod: tvm.IRModule, block: relax.DataflowBlock):
        self.mod_, self.values = mod, {b.var: b.value for b in block.bindings}

    def lookup_binding(self, var):
        return self.values.get(var)


def _reads_factored_product(mod: tvm.IRModule, func: relax.Function, index: int) -> bool:
    """Whether ``func``'s parameter ``index`` is, possibly through a cast, the activation of a
    one-token product that ``factor_row_products_pass`` turns into the factored kernel."""
    block = _single_block(func)
    if block is None:
        return False
    param, bindings = func.params[index], _Bindings(mod, block)
    producers = bindings.values
    astype, matmul = tvm.ir.Op.get("relax.astype"), tvm.ir.Op.get("relax.matmul")
    for binding in block.bindings:
        call = binding.value
        if not isinstance(call, relax.Call) or call.op != matmul:
            continue
        activation = call.args[0]
        source = producers.get(activation)
        if isinstance(source, relax.Call) and source.op == astype:
            activation = source.args[0]
        if activation.same_as(param) and factorable_product(bindings, call, float16_activation=True):
            return True
    return False


def merged_function(norm: relax.Function, product: relax.Function, index: int) -> relax.Function:
    """One Primitive function computing ``norm`` and then ``product`` with its parameter ``index``
    bound to the norm's result: parameters of the norm, then the product's others."""
    norm, product = relax.utils.copy_with_new_vars(norm), relax.utils.copy_with_new_vars(product)
    bound = product.bind_params({product.params[index]: norm.body.body})
    bindings = list(_single_block(norm).bindings) + list(_single_block(bound).bindings)
    return relax.Function(list(norm.params) + list(bound.params),
                          relax.SeqExpr([relax.DataflowBlock(bindings)], bound.body.body),
                          bound.ret_ty, attrs=product.attrs)


@relax.expr_functor.mutator
class _NormMerger(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, uses: dict):
        super().__init__(mod)
        self.mod_, self.uses, self.merged = mod, uses, {}

    def visit_call_(self, call):
        merged = self._merged_call(call)
        return merged if merged is not None else super().visit_call_(call)

    def _merged_call(self, call):
        product = _primitive(self.mod_, call.op)
        if product is None:
            return None
        for index, arg in enumerate(call.args):
            producer = self.lookup_binding(arg) if isinstance(arg, relax.Var) else None
            if not isinstance(producer, relax.Call) or self.uses.get(arg, 0) != 1:
                continue
            norm = _primitive(self.mod_, producer.op)
            if norm is None or not _is_rms_norm(norm) or not _reads_factored_product(self.mod_, product, index):
                continue
            key = (producer.op, call.op, index)
            if key not in self.merged:
                name = f"{producer.op.name_hint}_{call.op.name_hint}"
                self.merged[key] = self.builder_.add_func(merged_function(norm, product, index), name)
            others = [a for i, a in enumerate(call.args) if i != index]
            return relax.Call(self.merged[key], list(producer.args) + others)
        return None


def _use_counts(func: relax.Function) -> dict:
    """How often each variable of ``func``'s bindings is read (as a call argument or otherwise)."""
    uses: dict = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            read = list(value.args) if isinstance(value, relax.Call) else list(relax.analysis.free_vars(value))
            for var in read:
                if isinstance(var, relax.Var):
                    uses[var] = uses.get(var, 0) + 1
    for var in relax.analysis.free_vars(func.body.body):
        uses[var] = uses.get(var, 0) + 1
    return uses


def merge_norms_into_row_products_pass() -> tvm.transform.Pass:
    """RMS-norm functions read only by a factored one-token product -> one function with it."""

    @tvm.transform.module_pass(opt_level=0, name="SlimgraphMergeNormsIntoRowProducts")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        entries = [(gvar, func) for gvar, func in mod.functions_items()
                   if isinstance(func, relax.Function) and not is_primitive(func)]
        if not entries:
            return mod
        for gvar, func in entries:
            merger = _NormMerger(mod, _use_counts(func))
            merger.builder_.update_func(gvar, merger.visit_expr(func))
            mod = merger.builder_.get()
        return relax.transform.DeadCodeElimination()(mod)

    return _pass

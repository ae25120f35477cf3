"""CUDA dequantize arithmetic: codes made floats through the float's bits, not by a conversion.

A one-token product over packed int4 words dequantizes every weight it reads,

    W[k, n] = (q[k, n] - z[g, n]) * s[g, n],     q = (word >> 4 (k mod 8)) & 15,

which ``relax_ops.dequantize_compute`` writes as a shift, a mask, ``float(q)``, and one multiply-add
with ``s`` and the group's ``z * s``. The product reads 4 bits a weight, so at the memory bandwidth
of a GPU the dequantization is a lot of arithmetic: an H100 streaming 3 TB/s of int4 words must
unpack 6e12 weights a second. CUDA's throughput table lists conversions from and to 32-bit types
at 16 a clock and multiprocessor on Hopper, against 128 float multiply-adds: 132 multiprocessors at
about 1.7 GHz convert some 3.6e12 integers a second, fewer than such a kernel unpacks.

This pass (CUDA pipeline, before ``FuseTIR``) rebuilds every dequantize PrimFunc with the code
turned into a float through its bits instead: the float32 ``2^23`` (bits ``0x4B000000``) has a
23-bit mantissa of zeros, so or-ing a code ``q < 2^23`` into it gives the float ``2^23 + q``
exactly, and subtracting ``2^23`` leaves ``q`` exactly:

    float(q) = bits_as_float(q | 0x4B000000) - 2^23.

An or (one ``LOP3`` instruction can compute the mask and the or together) and a float subtraction,
both at the float rate. The values are bit for bit those of ``float(q)``: the kernels compute what they computed.

A second pass, for one-token products only, keeps the dequantized weight in float32: a float16
build's ``matmul(x, dequantize(..) -> f16, out f32)`` rounds every weight to float16 and converts it
back to float32 for the multiply-add, two conversions a weight; ``weights_in_float32`` makes it
``matmul(float32(x), dequantize(..) -> f32, out f32)``. The weights are then the exact
``(q - z) * s`` of float32 rather than their nearest float16 (a relative difference of at most
2^-11 a weight); the sums are float32 as before.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx

from slimgraph.backends.relax_ops import call_dequantize, dequantize_compute
from slimgraph.backends.schedules._quantized_gemv import DEQUANTIZE_ATTR, one_row, producer_spec, rewrite_primitives


def is_dequantize(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and DEQUANTIZE_ATTR in func.attrs


def codes_through_bits(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The dequantize PrimFunc ``func`` (words, scales, [zeros], output) rebuilt with
    ``codes_through_bits``: same parameters, shapes and attributes."""
    spec = func.attrs[DEQUANTIZE_ATTR]
    *inputs, output = list(func.params)
    holders = [te.placeholder(b.shape, b.dtype, name=b.name) for b in inputs]
    result = dequantize_compute(holders[0], holders[1], tuple(holders[2:]), bits=int(spec["bits"]),
                                group=int(spec["group_size"]), out_shape=output.shape, out_dtype=output.dtype,
                                codes_through_bits=True)
    rebuilt = te.create_prim_func(holders + [result]).without_attr("global_symbol")  # private, as before
    for key, value in func.attrs.items():
        rebuilt = rebuilt.with_attr(key, value)
    return rebuilt


def codes_through_bits_pass() -> tvm.transform.Pass:
    """Every dequantize PrimFunc of the module rebuilt by :func:`codes_through_bits`."""

    @tvm.transform.module_pass(opt_level=0, name="SlimgraphCodesThroughBits")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rebuilt = {gvar: codes_through_bits(func) for gvar, func in mod.functions_items() if is_dequantize(func)}
        if not rebuilt:
            return mod
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gvar, func in rebuilt.items():
            mod[gvar] = func
        return mod

    return _pass


@relax.expr_functor.mutator
class _WeightsInFloat32(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod

    def visit_call_(self, call):
        rewritten = self._rewritten(call)
        return rewritten if rewritten is not None else super().visit_call_(call)

    def _rewritten(self, call):
        if (call.op != tvm.ir.Op.get("relax.matmul") or str(call.attrs.out_dtype) != "float32"
                or not one_row(call.args[0].ty, "float16") or call.args[1].ty.dtype != "float16"):
            return None
        found = producer_spec(self, call.args[1], DEQUANTIZE_ATTR)
        if found is None:
            return None
        (producer, spec), shape = found, [int(d) for d in call.args[1].ty.shape.values]
        # plain float32 dequantize: codes_through_bits_pass, after this one, rewrites its arithmetic too
        weight = self.builder_.emit(call_dequantize(self.builder_, producer.args[1].fields, bits=int(spec["bits"]),
                                                    group=int(spec["group_size"]), out_shape=shape,
                                                    out_dtype="float32"))
        x = self.builder_.emit(relax.op.astype(call.args[0], "float32"))
        return relax.op.matmul(x, weight, out_dtype="float32")


def weights_in_float32_pass() -> tvm.transform.Pass:
    """One-row float16 products of fused functions read their dequantized weights as float32."""

    @tvm.transform.module_pass(opt_level=0, name="SlimgraphWeightsInFloat32")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_primitives(mod, _WeightsInFloat32(mod))

    return _pass

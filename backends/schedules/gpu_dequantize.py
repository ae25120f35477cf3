"""CUDA dequantize arithmetic: codes made floats through the float's bits, not by a conversion.

A one-token product over packed int4 words dequantizes every weight it reads,

    W[k, n] = (q[k, n] - z[g, n]) * s[g, n],     q = (word >> 4 (k mod 8)) & 15,

which ``relax_ops.dequantize_compute`` writes as a shift, a mask, ``float(q)``, and one multiply-add
with ``s`` and the group's ``z * s``. The product reads 4 bits a weight, so at the memory bandwidth
of a GPU the dequantization is a lot of arithmetic: an H100 streaming 3 TB/s of int4 words must
unpack 6e12 weights a second. NVIDIA GPUs convert an integer to a float (``I2F``) at a quarter of
the rate of float arithmetic (16 a clock and multiprocessor), which caps such a kernel below its
memory bandwidth.

This pass (CUDA pipeline, before ``FuseTIR``) rebuilds every dequantize PrimFunc with the code
turned into a float through its bits instead: the float32 ``2^23`` (bits ``0x4B000000``) has a
23-bit mantissa of zeros, so or-ing a code ``q < 2^23`` into it gives the float ``2^23 + q``
exactly, and subtracting ``2^23`` leaves ``q`` exactly:

    float(q) = bits_as_float(q | 0x4B000000) - 2^23.

An or (which CUDA fuses with the mask into one ``LOP3``) and a float subtraction, both at the full
rate. The values are bit for bit those of ``float(q)``: the kernels compute what they computed.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from slimgraph.backends.relax_ops import dequantize_compute
from slimgraph.backends.schedules._quantized_gemv import DEQUANTIZE_ATTR


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

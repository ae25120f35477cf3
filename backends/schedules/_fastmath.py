"""Vectorizable float32 replacements for exp / sigmoid / erf in TIR.

LLVM lowers ``llvm.exp.v16f32`` to sixteen scalar ``expf`` calls, so a
vectorized softmax, SiLU or GELU is bound by libm. These polynomial forms use
only FMA-friendly arithmetic and bit casts:

* exp: Cephes range reduction ``x = n ln2 + r``, degree-6 polynomial in r,
  ``2^n`` built in the exponent bits (rel. error ~1e-7 on [-88, 88]);
* sigmoid: ``1 / (1 + exp(-x))``;
* erf: Abramowitz & Stegun 7.1.26 (abs. error < 1.5e-7).
"""

import tvm
from tvm import tirx

_EXP_POLY = [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1]
_ERF_POLY = [1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592]


def _f(value: float):
    return tirx.const(value, "float32")


def fast_exp(x):
    """exp(x) for float32 x."""
    x = tirx.max(tirx.min(x, _f(88.3762626647949)), _f(-88.3762626647949))
    n = tirx.floor(x * _f(1.44269504088896341) + _f(0.5))
    r = x - n * _f(0.693359375) + n * _f(2.12194440e-4)
    poly = _f(_EXP_POLY[0])
    for coef in _EXP_POLY[1:]:
        poly = poly * r + _f(coef)
    poly = poly * r * r + r + _f(1.0)
    bits = tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32"))
    return poly * tirx.reinterpret("float32", bits)


def fast_sigmoid(x):
    """1 / (1 + exp(-x)) for float32 x."""
    return _f(1.0) / (_f(1.0) + fast_exp(_f(0.0) - x))


def fast_erf(x):
    """erf(x) for float32 x."""
    ax = tirx.abs(x)
    t = _f(1.0) / (_f(1.0) + _f(0.3275911) * ax)
    poly = _f(_ERF_POLY[0])
    for coef in _ERF_POLY[1:]:
        poly = poly * t + _f(coef)
    y = _f(1.0) - poly * t * fast_exp(_f(0.0) - ax * ax)
    return tirx.Select(x < _f(0.0), _f(0.0) - y, y)


_REWRITES = {"tirx.exp": fast_exp, "tirx.sigmoid": fast_sigmoid, "tirx.erf": fast_erf}


def _rewrite_call(node):
    if not isinstance(node, tirx.Call) or not isinstance(node.op, tvm.ir.Op):
        return None
    fn = _REWRITES.get(node.op.name)
    if fn is None or str(node.dtype) != "float32":
        return None
    return fn(node.args[0])


def use_fast_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Return ``func`` with float32 exp/sigmoid/erf calls replaced."""
    body = tirx.stmt_functor.ir_transform(func.body, None, _rewrite_call, ["tirx.Call"])
    return func.with_body(body)

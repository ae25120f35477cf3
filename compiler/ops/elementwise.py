"""Elementwise ops: unary math, binary arithmetic/comparison with numpy broadcasting, select, cast."""

from __future__ import annotations

import math

import numpy as np

from slimgraph.compiler.ops.registry import AttrKind, AttrSpec, OpCategory, OpDef, register
from slimgraph.compiler.types import DType, TensorType, broadcast_shapes

EW = OpCategory.ELEMENTWISE


def _same(inputs, attrs):
    return inputs[0]


def _erf(x):
    from scipy.special import erf as _scipy_erf  # scipy ships with the torch/sympy stack

    return _scipy_erf(x).astype(x.dtype)


def _gelu(x, attrs, ctx):
    if attrs["approximate"] == "tanh":
        c = np.asarray(math.sqrt(2.0 / math.pi), x.dtype)
        return (0.5 * x * (1.0 + np.tanh(c * (x + np.asarray(0.044715, x.dtype) * x * x * x)))).astype(x.dtype)
    return (0.5 * x * (1.0 + _erf(x / np.asarray(math.sqrt(2.0), x.dtype)))).astype(x.dtype)


def _sigmoid(x):
    from scipy.special import expit  # overflow-free 1 / (1 + exp(-x))

    return expit(x).astype(x.dtype)


def _unary(name, fn, *, attrs=(), doc=""):
    ref = (lambda ins, a, ctx: np.asarray(fn(ins[0], a, ctx))) if attrs else (lambda ins, a, ctx: np.asarray(fn(ins[0])))
    return register(OpDef(name, EW, _same, ref, attrs=attrs, arity=1, doc=doc))


NEG = _unary("neg", np.negative)
ABS = _unary("abs", np.abs)
EXP = _unary("exp", np.exp)
LOG = _unary("log", np.log)
SQRT = _unary("sqrt", np.sqrt)
RSQRT = _unary("rsqrt", lambda x: (1.0 / np.sqrt(x)).astype(x.dtype))
RECIPROCAL = _unary("reciprocal", lambda x: (1.0 / x).astype(x.dtype))
TANH = _unary("tanh", np.tanh)
SIGMOID = _unary("sigmoid", _sigmoid)
RELU = _unary("relu", lambda x: np.maximum(x, np.zeros((), x.dtype)))
SILU = _unary("silu", lambda x: (x * _sigmoid(x)).astype(x.dtype))
ERF = _unary("erf", _erf)
SIN = _unary("sin", np.sin)
COS = _unary("cos", np.cos)
FLOOR = _unary("floor", np.floor)
GELU = _unary("gelu", _gelu, attrs=(AttrSpec("approximate", AttrKind.STR, "none"),))
CLIP = _unary(
    "clip",
    lambda x, a, ctx: np.clip(x, a["min"], a["max"]).astype(x.dtype),
    attrs=(AttrSpec("min", AttrKind.FLOAT, -math.inf), AttrSpec("max", AttrKind.FLOAT, math.inf)),
)


def _logical_not_infer(inputs, attrs):
    return inputs[0].with_dtype(DType.bool)


LOGICAL_NOT = register(OpDef("logical_not", EW, _logical_not_infer,
                             lambda ins, a, ctx: np.logical_not(ins[0]), arity=1))


def _cast_infer(inputs, attrs):
    return inputs[0].with_dtype(attrs["dtype"])


CAST = register(OpDef(
    "cast", EW, _cast_infer,
    lambda ins, a, ctx: ins[0].astype(a["dtype"].numpy),
    attrs=(AttrSpec("dtype", AttrKind.DTYPE, required=True),), arity=1,
))


# ----------------------------------------------------------------------------- binary
def _binary_infer(result_dtype=None):
    def infer(inputs, attrs):
        a, b = inputs
        if a.dtype != b.dtype:
            raise ValueError(f"dtype mismatch {a.dtype} vs {b.dtype}")
        return TensorType(result_dtype or a.dtype, broadcast_shapes(a.shape, b.shape))

    return infer


def _binary(name, fn, *, result_dtype=None, commutative=False):
    def ref(ins, attrs, ctx):
        out = np.asarray(fn(ins[0], ins[1]))
        return out.astype(ctx.out_dtype.numpy, copy=False)

    return register(OpDef(name, EW, _binary_infer(result_dtype), ref, arity=2, commutative=commutative))


def _floor_div(a, b):
    if np.issubdtype(a.dtype, np.integer):
        return np.floor_divide(a, b)
    return np.floor(a / b)


ADD = _binary("add", np.add, commutative=True)
SUB = _binary("sub", np.subtract)
MUL = _binary("mul", np.multiply, commutative=True)
DIV = _binary("div", lambda a, b: np.true_divide(a, b) if a.dtype.kind == "f" else np.trunc(a / b))
FLOOR_DIV = _binary("floor_div", _floor_div)
MOD = _binary("mod", np.mod)
POW = _binary("pow", np.power)
MAXIMUM = _binary("maximum", np.maximum, commutative=True)
MINIMUM = _binary("minimum", np.minimum, commutative=True)
EQ = _binary("eq", np.equal, result_dtype=DType.bool, commutative=True)
NE = _binary("ne", np.not_equal, result_dtype=DType.bool, commutative=True)
LT = _binary("lt", np.less, result_dtype=DType.bool)
LE = _binary("le", np.less_equal, result_dtype=DType.bool)
GT = _binary("gt", np.greater, result_dtype=DType.bool)
GE = _binary("ge", np.greater_equal, result_dtype=DType.bool)
LOGICAL_AND = _binary("logical_and", np.logical_and, commutative=True)
LOGICAL_OR = _binary("logical_or", np.logical_or, commutative=True)


def _where_infer(inputs, attrs):
    cond, a, b = inputs
    if cond.dtype is not DType.bool:
        raise ValueError(f"where condition must be bool, got {cond.dtype}")
    if a.dtype != b.dtype:
        raise ValueError(f"where branches differ in dtype: {a.dtype} vs {b.dtype}")
    return TensorType(a.dtype, broadcast_shapes(cond.shape, a.shape, b.shape))


WHERE = register(OpDef("where", EW, _where_infer,
                       lambda ins, a, ctx: np.where(ins[0], ins[1], ins[2]).astype(ctx.out_dtype.numpy),
                       arity=3))

UNARY_FLOAT_OPS = (NEG, ABS, EXP, LOG, SQRT, RSQRT, RECIPROCAL, TANH, SIGMOID, RELU, SILU, ERF, SIN, COS,
                   FLOOR, GELU, CLIP)

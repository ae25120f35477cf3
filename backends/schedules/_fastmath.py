"""Vectorizable float32 exp / sigmoid / silu / erf / softmax / gelu (Relax level).

LLVM lowers ``llvm.exp.v16f32`` to sixteen scalar ``expf`` calls, so a
vectorized softmax, SiLU or GELU would be bound by libm. Before legalization
this pass rewrites those float32 ops to TOPI's polynomial ``fast_exp`` /
``fast_erf`` / ``fast_softmax`` (FMA arithmetic and exponent bit tricks only),
extending TVM's ``FastMathTransform`` with sigmoid, SiLU (``x * sigmoid(x)``) and erf-GELU.
"""

import tvm
from tvm import relax, te, topi
from tvm.relax import expr_functor
from tvm.relax.transform.fast_math import FastMathCodeGenerator


def _fast_sigmoid(x: te.Tensor) -> te.Tensor:
    exp = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: 1.0 / (1.0 + exp(*i)), name="fast_sigmoid")


def _fast_silu(x: te.Tensor) -> te.Tensor:
    exp = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: x(*i) / (1.0 + exp(*i)), name="fast_silu")


def _fast_gelu(x: te.Tensor) -> te.Tensor:
    erf = topi.fast_erf(topi.multiply(x, 0.7071067811865476))
    return te.compute(x.shape, lambda *i: x(*i) * (0.5 + 0.5 * erf(*i)), name="fast_gelu")


def _fast_gelu_tanh(x: te.Tensor) -> te.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    inner = te.compute(x.shape, lambda *i: 0.7978845608028654 * (x(*i) + 0.044715 * x(*i) * x(*i) * x(*i)))
    tanh = topi.fast_tanh(inner)
    return te.compute(x.shape, lambda *i: x(*i) * (0.5 + 0.5 * tanh(*i)), name="fast_gelu_tanh")


# float32 ops rewritten here (FastMathCodeGenerator handles exp, erf, tanh, softmax)
_REWRITES = {"relax.sigmoid": _fast_sigmoid, "relax.nn.silu": _fast_silu, "relax.nn.gelu": _fast_gelu,
             "relax.nn.gelu_tanh": _fast_gelu_tanh}


@expr_functor.mutator
class _FastMath(FastMathCodeGenerator._cls):  # pylint: disable=abstract-method
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if not isinstance(call.op, tvm.ir.Op):
            return call  # a call to a fused (primitive) function: its arguments are plain variables
        if getattr(call.ty, "dtype", "") != "float32":
            return super().visit_call_(call)
        rewrite = _REWRITES.get(call.op.name)
        if rewrite is not None:
            return self.builder_.call_te(rewrite, call.args[0])
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="SlimgraphFastMath")
def fast_math_pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Rewrite float32 exp/erf/tanh/softmax/sigmoid/silu/gelu to polynomial forms."""
    mutator = _FastMath(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()

"""Algebraic simplification: local rewrite rules applied until nothing changes.

Rules are looked up by the node's op (a dict keyed by op objects) and see the *new* graph built
so far, so a rule can match a pattern whose inner nodes were already rewritten. Each rule returns
the value that replaces the node (an existing value, a weight, or a node it emitted under the
node's name) or None. Every rewrite preserves values exactly or within fp32 rounding:

* ``reshape(reshape(x, s1), s2) = reshape(x, s2)``; a reshape, broadcast_to or cast to the same
  type is ``x``.
* ``transpose(transpose(x, p1), p2) = transpose(x, q)`` with ``q[i] = p1[p2[i]]``; an identity
  permutation is ``x``.
* ``x * 1``, ``1 * x``, ``x + 0``, ``0 + x``, ``x - 0``, ``x / 1`` are ``x`` when the result has
  ``x``'s type (no broadcasting by the constant).
* A transpose/reshape/cast of a weight is computed once at compile time: ``matmul(x,
  transpose(@W))`` becomes ``matmul(x, @W.T)`` with ``W.T`` a contiguous [in, out] array.
* ``matmul(a[..., M, 1], b[..., 1, N]) = a * b`` (an outer product needs no reduction).
* ``pow(x, n)`` for n = 2, 3, 4 is a product of ``x`` (``x*x``, ``(x*x)*x``, ``(x*x)*(x*x)``):
  exact for negative ``x``, where ``pow`` compiled as ``exp2(n * log2(x))`` (CUDA's fast math)
  returns NaN, and cheaper (GPT-2's tanh GELU computes ``x^3``).
* An embedding lookup whose table also exists transposed (tied input/output embeddings) reads
  the transposed copy, so the table is stored once.
* Normalizations written with primitives become single ops, and batch norm after a convolution
  is folded into its weights -- see :mod:`slimgraph.passes.norm_patterns`.

The unused nodes a rewrite leaves behind are removed by ``dce``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.ir import Function, Module, Node, Weight
from slimgraph.compiler.ops import RefContext
from slimgraph.compiler.passmanager import PassResult, register_pass
from slimgraph.passes._rewrite import Rewriter, add_weight, scalar_value
from slimgraph.passes.constant_folding import weight_suffix

MAX_ROUNDS = 8


@dataclass
class Context:
    """What a rule sees: the rewriter (new graph so far) and use counts of the old function."""

    rw: Rewriter
    uses: Counter

    def single_use(self, ref: str) -> bool:
        return self.uses.get(ref, 0) == 1 and ref in self.rw.nodes

    def producer(self, ref: str, op) -> Node | None:
        """The node defining ``ref`` if it applies ``op``."""
        node = self.rw.producer(ref)
        return node if node is not None and node.op is op else None


# ----------------------------------------------------------------------------- layout and casts
def same_type_identity(ctx: Context, node: Node, inputs: tuple) -> str | None:
    """reshape/broadcast_to/cast whose result has its input's type is the input."""
    return inputs[0] if ctx.rw.type_of(inputs[0]) == node.type else None


def reshape_of_reshape(ctx: Context, node: Node, inputs: tuple) -> str | None:
    inner = ctx.producer(inputs[0], ops.RESHAPE)
    if inner is None:
        return None
    source = inner.inputs[0]
    if ctx.rw.type_of(source) == node.type:
        return source
    return ctx.rw.add(ops.RESHAPE, (source,), {"shape": node.attrs["shape"]}, name=node.name)


def transpose_identity(ctx: Context, node: Node, inputs: tuple) -> str | None:
    return inputs[0] if tuple(node.attrs["perm"]) == tuple(range(len(node.attrs["perm"]))) else None


def transpose_of_transpose(ctx: Context, node: Node, inputs: tuple) -> str | None:
    inner = ctx.producer(inputs[0], ops.TRANSPOSE)
    if inner is None:
        return None
    p1, p2 = inner.attrs["perm"], node.attrs["perm"]
    perm = tuple(p1[i] for i in p2)
    if perm == tuple(range(len(perm))):
        return inner.inputs[0]
    return ctx.rw.add(ops.TRANSPOSE, (inner.inputs[0],), {"perm": perm}, name=node.name)


def pretransform_weight(ctx: Context, node: Node, inputs: tuple) -> str | None:
    """Apply a layout op or cast to a weight now; the result is a new contiguous weight."""
    array = ctx.rw.weight_array(inputs[0])
    if array is None or not node.type.is_static:
        return None
    result = node.op.reference([array], node.attrs, RefContext(node.type.shape, node.type.dtype, {}))
    hint = f"{inputs[0][1:]}.{weight_suffix(node)}"
    return add_weight(ctx.rw.weights, hint, np.asarray(result, order="C"))


def outer_product(ctx: Context, node: Node, inputs: tuple) -> str | None:
    """``matmul(a[..., M, 1], b[..., 1, N])`` is the broadcasting product ``a * b`` (no reduction:
    rotary embeddings compute ``inv_freq[:, None] @ positions[None, :]`` this way)."""
    a, b = (ctx.rw.type_of(i) for i in inputs)
    if a.rank < 2 or b.rank < 2 or a.shape[-1] != 1 or b.shape[-2] != 1:
        return None
    return ctx.rw.add(ops.MUL, inputs, name=node.name)


def integer_power(ctx: Context, node: Node, inputs: tuple) -> str | None:
    """``pow(x, n)`` for a constant n in {2, 3, 4} as multiplications."""
    exponent = scalar_value(ctx.rw, inputs[1])
    if exponent not in (2.0, 3.0, 4.0) or ctx.rw.type_of(inputs[0]) != node.type:
        return None
    x = inputs[0]
    if exponent == 2.0:
        return ctx.rw.add(ops.MUL, (x, x), name=node.name)
    square = ctx.rw.add(ops.MUL, (x, x), name=f"{node.name}_square")
    return ctx.rw.add(ops.MUL, (square, x if exponent == 3.0 else square), name=node.name)


def gather_from_transposed_copy(ctx: Context, node: Node, inputs: tuple) -> str | None:
    """``take(@W, ids, axis=0) = transpose(take(@V, ids, axis=1))`` when the module also holds
    ``V = W^T`` (a tied embedding whose transposed copy feeds the LM head): the lookup then reads
    the copy and ``W`` becomes dead, so the table is stored once."""
    table = ctx.rw.weight_array(inputs[0])
    if table is None or table.ndim != 2 or node.attrs["axis"] != 0:
        return None
    twin = _transposed_twin(ctx, inputs[0][1:], table)
    if twin is None:
        return None
    index_rank = ctx.rw.type_of(inputs[1]).rank
    gathered = ctx.rw.add(ops.TAKE, ("@" + twin, inputs[1]), {"axis": 1}, name=f"{node.name}_columns")
    perm = tuple(range(1, index_rank + 1)) + (0,)
    return ctx.rw.add(ops.TRANSPOSE, (gathered,), {"perm": perm}, name=node.name)


def _transposed_twin(ctx: Context, name: str, table: np.ndarray) -> str | None:
    """A weight other than ``name`` whose data is ``table.T`` (same content, compared exactly)."""
    want = (table.shape[1], table.shape[0])
    candidates = [k for k, w in ctx.rw.weights.items()
                  if k != name and w.has_data and tuple(w.type.shape) == want and w.type.dtype.numpy == table.dtype]
    for key in sorted(candidates):
        if np.array_equal(ctx.rw.weights[key].array, table.T):
            return key
    return None


# ----------------------------------------------------------------------------- neutral elements
def _neutral(ctx: Context, node: Node, keep: str, other: str, value: float) -> str | None:
    if scalar_value(ctx.rw, other) == value and ctx.rw.type_of(keep) == node.type:
        return keep
    return None


def mul_by_one(ctx, node, inputs):
    return _neutral(ctx, node, inputs[0], inputs[1], 1.0) or _neutral(ctx, node, inputs[1], inputs[0], 1.0)


def add_zero(ctx, node, inputs):
    return _neutral(ctx, node, inputs[0], inputs[1], 0.0) or _neutral(ctx, node, inputs[1], inputs[0], 0.0)


def sub_zero(ctx, node, inputs):
    return _neutral(ctx, node, inputs[0], inputs[1], 0.0)


def div_by_one(ctx, node, inputs):
    return _neutral(ctx, node, inputs[0], inputs[1], 1.0)


def _rules() -> dict:
    from slimgraph.passes import norm_patterns as norms

    return {
        ops.RESHAPE: (same_type_identity, reshape_of_reshape, pretransform_weight),
        ops.TRANSPOSE: (transpose_identity, transpose_of_transpose, pretransform_weight),
        ops.CAST: (same_type_identity, pretransform_weight),
        ops.BROADCAST_TO: (same_type_identity,),
        ops.MUL: (mul_by_one, norms.rms_norm_mul, norms.layer_norm_mul, norms.norm_times_weight),
        ops.DIV: (div_by_one, norms.rms_norm_div, norms.layer_norm_div, norms.softmax),
        ops.ADD: (add_zero, norms.layer_norm_plus_bias),
        ops.SUB: (sub_zero,),
        ops.BATCH_NORM: (norms.fold_batch_norm,),
        ops.MATMUL: (outer_product,),
        ops.POW: (integer_power,),
        ops.TAKE: (gather_from_transposed_copy,),
    }


def simplify_function(module: Module, fn: Function, weights: dict[str, Weight], fired: Counter) -> Function:
    """Apply the rules to ``fn`` in rounds until a round changes nothing."""
    rules = _rules()
    for _ in range(MAX_ROUNDS):
        rw = Rewriter(module, fn, weights)
        ctx = Context(rw, Counter(i for n in fn.nodes for i in n.inputs) + Counter(fn.outputs))
        count = 0
        for node in fn.nodes:
            inputs = rw.inputs(node)
            for rule in rules.get(node.op, ()):
                ref = rule(ctx, node, inputs)
                if ref is not None and rw.replace(node, ref):
                    fired[rule.__name__] += 1
                    count += 1
                    break
            else:
                rw.keep(node)
        fn = rw.finish()
        if not count:
            break
    return fn


@register_pass("simplify")
def simplify(module: Module) -> PassResult:
    """Algebraic rewrites, weight pre-transposition, norm/softmax recognition, batch-norm folding."""
    weights = dict(module.weights)
    fired: Counter = Counter()
    functions = {name: simplify_function(module, fn, weights, fired) for name, fn in module.functions.items()}
    stats = dict(sorted(fired.items()))
    if not fired:
        return PassResult(module, False, stats)
    return PassResult(Module(functions, weights, module.metadata), True, stats)

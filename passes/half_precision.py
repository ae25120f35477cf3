"""Float16 compute (``--fp16``, GPU targets): float32 weights and activations become float16.

Halving the bytes of every weight and activation halves the memory traffic that bounds small-batch
inference, and lets the GPU use its float16 units. Float16 has an 11-bit significand (relative
step 2^-11 ~ 4.9e-4) and a largest finite value of 65504, so three places keep float32:

* **Accumulations.** A dot product of length K summed in float16 carries an error growing like
  sqrt(K) * 2^-11; ``matmul`` therefore reads float16 operands and accumulates in float32
  (``out_dtype=f32``), and its result is rounded to float16 once.
* **Reductions and normalizations** (sum, mean, max, softmax, layer/RMS norm, cumsum, pooling): the
  input is cast to float32, the op runs in float32 and its result is cast back. A softmax over
  scores of magnitude ~10 or a mean of squares near 65504 would otherwise lose everything.
* **The interface.** Float32 inputs are cast to float16 on entry, float outputs back to float32,
  so callers see the same signature as the float32 model -- except the key/value caches of a
  generation build, which are stored in float16 (half the bytes each decode step reads) and
  written in place, so they are float16 params and outputs.

Every other float32 value -- element-wise ops, layout ops, constants, ``dequantize`` results --
is float16. Weights are converted with round-to-nearest-even; a weight beyond float16's range is
an error naming it, except fill values (constants and weights of at most 16 elements, such as the
``finfo(float32).min`` of attention masks), which are clamped to +-65504 so ``0 * fill`` stays 0. Run before fusion, so each cast fuses into the kernel next to it. Outputs
differ from the float32 model by rounding (the pass is lossy; ``--verify`` re-bases after it).
"""

from __future__ import annotations

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.errors import CompressionError
from slimgraph.compiler.ir import Function, Module, Node, Param, Weight
from slimgraph.compiler.kv_cache import GENERATION_METADATA, CacheLayout
from slimgraph.compiler.ops import AttrKind, OpCategory
from slimgraph.compiler.passmanager import PassResult, register_pass
from slimgraph.compiler.types import DType
from slimgraph.passes._rewrite import Rewriter

F16_MAX = float(np.finfo(np.float16).max)
PRECISION_KEY = "compute_precision"   # module metadata: "f16" once converted (the pass is idempotent)
SCALAR_LIKE = 16          # weights this small are fill values, clamped like constants
FLOAT32_OPS = (OpCategory.REDUCTION, OpCategory.NORMALIZATION)


def _half_weights(module: Module) -> dict[str, Weight]:
    weights = dict(module.weights)
    for name, weight in module.weights.items():
        if weight.type.dtype is not DType.f32:
            continue
        array = weight.array
        if array.size <= SCALAR_LIKE:
            array = np.asarray(np.clip(array, -F16_MAX, F16_MAX))     # mask fill values, as for constants
        peak = float(np.abs(array).max(initial=0.0))
        if not np.isfinite(peak) or peak > F16_MAX:
            raise CompressionError(f"weight {name} has values up to {peak:g}, beyond float16's range "
                                   f"({F16_MAX:g}); compile without --fp16")
        weights[name] = Weight(array.astype(np.float16))
    return weights


def _cast(rw: Rewriter, ref: str, dtype: DType, hint: str) -> str:
    if rw.type_of(ref).dtype is dtype:
        return ref
    return rw.add(ops.CAST, [ref], {"dtype": dtype}, name=hint)


def _half_attr(kind: AttrKind, value):
    if kind is AttrKind.DTYPE and value is DType.f32:
        return DType.f16
    if kind is AttrKind.FLOAT and np.isfinite(value) and abs(value) > F16_MAX:
        return float(np.sign(value)) * F16_MAX     # e.g. finfo(f32).min of attention masks: 0 * it stays 0
    return value


def _half_attrs(node: Node) -> dict:
    """The node's attributes with float32 dtypes turned to float16 and finite float values beyond
    float16's range clamped to +-65504 (not rounded to infinity, which would make ``0 * x`` NaN)."""
    kinds = {spec.name: spec.kind for spec in node.op.attrs}
    return {k: _half_attr(kinds[k], v) for k, v in node.attrs.items()}


def _convert_node(rw: Rewriter, node: Node) -> None:
    inputs = rw.inputs(node)
    float_out = node.type.dtype is DType.f32
    narrow = float_out and node.name not in rw.outputs      # an f32 output keeps its f32 result
    if node.op is ops.MATMUL and float_out:
        out = rw.add(ops.MATMUL, inputs, {"out_dtype": DType.f32}, name=f"{node.name}_f32" if narrow else node.name)
        rw.replace(node, _cast(rw, out, DType.f16, node.name) if narrow else out)
    elif node.op.category in FLOAT32_OPS or node.op.category is OpCategory.CONTRACTION:
        wide = [_cast(rw, r, DType.f32, f"{node.name}_in{i}") if rw.type_of(r).dtype is DType.f16 else r
                for i, r in enumerate(inputs)]
        out = rw.add(node.op, wide, dict(node.attrs.items()), name=f"{node.name}_f32" if narrow else node.name)
        rw.replace(node, _cast(rw, out, DType.f16, node.name) if narrow else out)
    else:
        rw.replace(node, rw.add(node.op, inputs, _half_attrs(node), name=node.name))


def _half_caches(rw: Rewriter, fn: Function) -> set[str]:
    """Make the float32 KV-cache params float16 in place (no cast: the cache is stored in float16)."""
    caches = {n.inputs[0] for n in fn.nodes if n.op is ops.KV_CACHE_WRITE}
    for i, p in enumerate(rw.builder.params):
        if p.name in caches and p.type.dtype is DType.f32:
            rw.builder.params[i] = Param(p.name, p.type.with_dtype(DType.f16))
            rw.builder.types[p.name] = rw.builder.params[i].type
    return caches


def _convert_function(module: Module, fn: Function, weights: dict[str, Weight]) -> Function:
    rw = Rewriter(module, fn, weights)
    caches = _half_caches(rw, fn)
    for p in fn.params:
        if p.type.dtype is DType.f32 and p.name not in caches:
            rw.subst[p.name] = _cast(rw, p.name, DType.f16, f"{p.name}_f16")
    for node in fn.nodes:
        _convert_node(rw, node)
    written = {n.name for n in fn.nodes if n.op is ops.KV_CACHE_WRITE}
    for out in fn.outputs:
        new = rw.ref(out)
        if rw.type_of(new).dtype is DType.f16 and out not in written:
            rw.subst[out] = rw.add(ops.CAST, [new], {"dtype": DType.f32}, name=f"{out}_f32")
    return rw.finish()


@register_pass("half_precision", lossy=True)
def half_precision(module: Module) -> PassResult:
    """Compute in float16: float32 weights and activations become float16, matmuls accumulate in
    float32, reductions and normalizations run in float32; inputs and outputs stay float32."""
    if module.metadata.get(PRECISION_KEY) == "f16":
        return PassResult(module, False, {"weights_converted": 0})
    weights = _half_weights(module)
    functions = dict(module.functions)
    for fn in module.entries:
        functions[fn.name] = _convert_function(module.with_weights(weights), fn, weights)
    metadata = {**module.metadata, PRECISION_KEY: "f16"}
    if GENERATION_METADATA in metadata:
        metadata[GENERATION_METADATA] = CacheLayout.from_json(metadata[GENERATION_METADATA]).with_dtype("f16").to_json()
    new = Module(functions, weights, metadata)
    converted = sum(1 for n, w in module.weights.items() if w.type.dtype is DType.f32)
    return PassResult(new, True, {"weights_converted": converted,
                                  "weight_bytes_before": module.weight_bytes(), "weight_bytes_after": new.weight_bytes()})

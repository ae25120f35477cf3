"""PyTorch frontend: ``torch.export`` programs -> slimgraph IR.

Pipeline: ``torch.export.export`` (dynamic dims named by the user, e.g. ``{"input_ids": {1: "T"}}``)
-> ``ep.run_decompositions({})`` -> one converter per ATen op.

Why an *empty* decomposition table: it inlines the higher-order ops that Hugging Face exports contain
(``_vmap_increment_nesting``, ``flat_apply``, ``wrap_with_set_grad_enabled``) and normalizes
pre-dispatch aliases (``to`` -> ``_to_copy``, ``reshape`` -> ``view``), but keeps ``linear``,
``layer_norm``, ``scaled_dot_product_attention``, ``softmax``, ``gelu``, ``conv2d`` whole, which map
one-to-one onto slimgraph ops. Measured on SmolLM2-135M (2 cores): 10-12 s with ``{}`` versus 19 s
with the default core-ATen table (which also shatters every linear into view/permute/mm); the default
table minus linear/layer_norm/sdpa/softmax/gelu/silu/embedding costs the same as ``{}`` (10.5 s).

Converters live in ``torch_converters`` (elementwise, casts, creation, reductions), ``torch_layout``
(views, slicing, indexing) and ``torch_nn`` (linear, norms, conv, pooling, attention), registered in
a dict keyed by ATen overload or packet (see ``torch_context.converts``).

Weights (parameters, buffers, lifted constants) become module weights that are numpy *views* of the
torch tensors; they are checked once for NaN/Inf.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections import Counter

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from slimgraph.compiler.errors import (
    InternalError, NonFiniteWeightError, ShapeMismatchError, UnsupportedError, UnsupportedOpsError,
)
from slimgraph.compiler.frontends import torch_converters, torch_layout, torch_nn  # noqa: F401 (registration)
from slimgraph.compiler.frontends.torch_context import CONVERTERS, IGNORED, ConversionUnsupported, ImportContext, SizeValue
from slimgraph.compiler.ir import Module, Weight, sanitize_name
from slimgraph.compiler.types import dims_equal

_SIZE_TYPES = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


# ----------------------------------------------------------------------------- public API
def import_torch_module(module: torch.nn.Module, example_inputs: tuple | dict, *,
                        dynamic_dims: dict[str, dict[int, str]] | None = None, source: str,
                        max_sizes: dict[str, int] | None = None, output_names=None) -> "Module":
    """Export ``module`` (in eval mode) with ``torch.export`` and import the program.

    ``dynamic_dims`` names symbolic axes per input, e.g. ``{"input_ids": {1: "T"}}``; the same name
    in several inputs is one symbol. ``max_sizes`` bounds a dim (``{"T": 512}`` for BERT's positions).
    """
    module = module.eval()
    arg_names = _input_names(module, example_inputs)
    args, kwargs = (tuple(example_inputs), {}) if not isinstance(example_inputs, dict) else ((), dict(example_inputs))
    dynamic_shapes = _dynamic_shapes(arg_names, dynamic_dims or {}, max_sizes or {}, isinstance(example_inputs, dict))
    ep = export_module(module, args, kwargs, dynamic_shapes=dynamic_shapes, source=source)
    return import_exported_program(ep, source=source, dim_names=dynamic_dims, output_names=output_names)


def export_module(module: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, dynamic_shapes=None,
                  source: str) -> ExportedProgram:
    """``torch.export.export`` (non-strict, no grad); a failure is one UnsupportedError naming ``source``."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.export.export(module.eval(), args, kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch raises many unrelated types here; report them as one
        lines = [line for line in str(exc).splitlines() if line.strip()][:6] or [type(exc).__name__]
        raise UnsupportedError(f"{source}: torch.export could not trace the model: " + "\n  ".join(lines),
                               hint="check that the model runs in eval mode on the example inputs") from None


def import_exported_program(ep: ExportedProgram, *, source: str, input_names=None, dim_names=None,
                            output_names=None) -> Module:
    """Convert an ExportedProgram into a slimgraph module with one entry function ``main``.

    ``input_names`` renames the user inputs in order; ``dim_names`` ({input: {axis: name}}) names
    the symbolic dims (unnamed symbols keep torch's names such as ``s0``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ep = ep.run_decompositions({})
    graph = ep.graph_module.graph
    _check_supported(graph, source)
    weights, placeholder_refs = _collect_weights(ep, source)
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs if s.kind is InputKind.USER_INPUT]
    renames = dict(zip(user_inputs, input_names or user_inputs))
    ctx = ImportContext(source, weights, _symbol_names(graph, dim_names or {}, renames))
    for node in graph.nodes:
        ctx.node = node
        if node.op == "placeholder":
            _import_placeholder(ctx, node, placeholder_refs, renames)
        elif node.op == "call_function":
            _convert_node(ctx, node)
        elif node.op == "output":
            _import_outputs(ctx, node, ep)
    ctx.node = None
    metadata = {"source": source, "frontend": "torch"}
    if output_names:
        metadata["output_names"] = ",".join(output_names)
    fn = ctx.builder.build()
    used = fn.weight_refs()  # drops buffers nothing reads (num_batches_tracked, ...)
    return Module({"main": fn}, {k: w for k, w in weights.items() if k in used}, metadata)


# ----------------------------------------------------------------------------- export helpers
def _input_names(module, example_inputs) -> list[str]:
    if isinstance(example_inputs, dict):
        return list(example_inputs)
    params = list(inspect.signature(module.forward).parameters)
    return params[:len(example_inputs)]


def _dynamic_shapes(arg_names, dynamic_dims, max_sizes, by_name: bool):
    if not dynamic_dims:
        return None
    dims = {}
    for axes in dynamic_dims.values():
        for name in axes.values():
            if name not in dims:
                dims[name] = torch.export.Dim(name, min=1, max=max_sizes.get(name, 1 << 20))
    per_input = {n: ({a: dims[d] for a, d in dynamic_dims[n].items()} if n in dynamic_dims else None)
                 for n in arg_names}
    return per_input if by_name else tuple(per_input[n] for n in arg_names)


def _symbol_names(graph, dim_names, renames) -> dict[str, str]:
    """torch shape symbol ("s0") -> user dim name ("T"), read from the inputs' fake shapes."""
    out = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        axes = dim_names.get(renames.get(node.name, node.name)) or dim_names.get(node.name) or {}
        val = node.meta.get("val")
        for axis, name in axes.items():
            if val is not None and isinstance(val.shape[axis], torch.SymInt):
                expr = val.shape[axis].node.expr
                if expr.is_Symbol:
                    out[expr.name] = name
    return out


# ----------------------------------------------------------------------------- weights and inputs
def _collect_weights(ep: ExportedProgram, source: str):
    """Parameters, buffers and lifted constants -> Weight views; returns (weights, placeholder -> ref)."""
    weights, refs = {}, {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind is InputKind.USER_INPUT:
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise UnsupportedOpsError(source, {f"input kind {spec.kind.name}": (1, spec.arg.name)})
        tensor = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
        name = sanitize_name(spec.target)
        weights[name] = Weight(_numpy_view(tensor, spec.target, source))
        refs[spec.arg.name] = "@" + name
    return weights, refs


def _numpy_view(tensor: torch.Tensor, name: str, source: str) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype is torch.bfloat16:
        tensor = tensor.float()
    array = tensor.numpy()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise NonFiniteWeightError(f"{source}: weight {name!r} {tuple(array.shape)} has {bad} NaN/Inf value(s)",
                                   hint="the checkpoint is corrupt or was saved mid-divergence")
    return array


def _import_placeholder(ctx: ImportContext, node, placeholder_refs, renames):
    if node.name in placeholder_refs:
        ctx.values[node] = placeholder_refs[node.name]
        return
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise UnsupportedOpsError(ctx.source, {"non-tensor input": (1, node.name)})
    ctx.values[node] = ctx.builder.param(renames.get(node.name, node.name), ctx.meta_type(node))


def _import_outputs(ctx: ImportContext, node, ep):
    refs = []
    for spec, arg in zip(ep.graph_signature.output_specs, node.args[0]):
        if spec.kind is not OutputKind.USER_OUTPUT:
            continue
        ref = ctx.values.get(arg) if ctx.is_tensor(arg) else None
        if ref is None or ref.startswith("@"):
            raise UnsupportedOpsError(ctx.source, {"output that is not a computed tensor": (1, str(arg))})
        refs.append(ref)
    ctx.builder.output(*refs)


# ----------------------------------------------------------------------------- ops
def _lookup(target):
    fn = CONVERTERS.get(target)
    if fn is None and hasattr(target, "overloadpacket"):
        fn = CONVERTERS.get(target.overloadpacket)
    return fn


def _is_size_node(node) -> bool:
    """Nodes computing Python/Sym scalars (sym_size, s0 * 2, ...): folded into dims at import."""
    return isinstance(node.meta.get("val"), _SIZE_TYPES)


def _check_supported(graph, source: str) -> None:
    """Collect every op without a converter and raise them all at once."""
    counts, examples = Counter(), {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem or node.target in IGNORED:
            continue
        if _is_size_node(node) or _lookup(node.target) is not None:
            continue
        key = str(node.target)
        counts[key] += 1
        examples.setdefault(key, node.name)
    if counts:
        raise UnsupportedOpsError(source, {k: (counts[k], examples[k]) for k in counts})


def bind_args(node) -> dict:
    """Positional + keyword args of an ATen call by schema name, with the schema's defaults."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def _convert_node(ctx: ImportContext, node) -> None:
    if node.target in IGNORED:
        return
    if node.target is operator.getitem:
        ctx.values[node] = ctx.values[node.args[0]][node.args[1]]
        return
    if _is_size_node(node):
        val = node.meta["val"]
        ctx.values[node] = SizeValue(ctx.dim(val) if isinstance(val, (int, torch.SymInt)) else val)
        return
    try:
        result = _lookup(node.target)(ctx, bind_args(node))
    except ConversionUnsupported as exc:
        raise ctx.error_for(node, str(exc)) from None
    except ValueError as exc:
        raise ShapeMismatchError(f"{ctx.source}: node {node.name} ({node.target}): {exc}") from None
    ctx.values[node] = result
    _check_type(ctx, node, result)


def _check_type(ctx: ImportContext, node, result) -> None:
    """The inferred IR type must match torch's own metadata (a converter bug otherwise)."""
    val = node.meta.get("val")
    if not isinstance(result, str) or not isinstance(val, torch.Tensor):
        return
    got, want = ctx.type(result), ctx.meta_type(node)
    same_shape = got.rank == want.rank and all(a == b or dims_equal(a, b) for a, b in zip(got.shape, want.shape))
    if got.dtype is not want.dtype or not same_shape:
        raise InternalError(f"{ctx.source}: converting {node.name} ({node.target}) gave {got}, torch says {want}")

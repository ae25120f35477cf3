"""ONNX frontend: ``import_onnx("model.onnx") -> Module``.

Steps, each failing with a project error that names the file / node / tensor:

1. load the protobuf without external data (ModelLoadError for truncated or garbage files);
2. validate every external-data location (ExternalDataError: escapes the folder, missing file);
3. sort the nodes topologically (ONNX allows any order if acyclic; GraphStructureError names the
   node and tensor of a cycle or of an undefined input);
4. list every unsupported op at once (UnsupportedOpsError);
5. load initializers as weights, memory-mapping external data (NonFiniteWeightError for NaN/Inf);
6. convert node by node with the converters registered (by op_type) in :mod:`onnx_ops`,
   :mod:`onnx_nn_ops`, :mod:`onnx_shape_ops` and :mod:`onnx_source_ops`.

Symbolic input dims (``batch_size``, ``sequence_length``) stay symbolic (sanitized) unless
``shapes`` fixes them: ``import_onnx(p, shapes={"input_ids": (1, 128)})`` binds both symbols of
input_ids everywhere they appear. A string entry renames a symbol (``(1, "T")``).
"""

from __future__ import annotations

import heapq
import os

import onnx

from slimgraph.compiler import ops
from slimgraph.compiler.errors import (
    GraphStructureError, InternalError, ModelLoadError, ShapeSpecError, SlimgraphError, UnsupportedError,
    UnsupportedOpsError,
)
from slimgraph.compiler.frontends import onnx_nn_ops, onnx_ops, onnx_shape_ops, onnx_source_ops  # noqa: F401
from slimgraph.compiler.frontends.onnx_context import CONVERTERS, ImportState, NodeContext, Val
from slimgraph.compiler.frontends.onnx_weights import check_external_locations, check_finite, ir_dtype, tensor_to_array
from slimgraph.compiler.ir import Module, sanitize_name
from slimgraph.compiler.types import TensorType

SUPPORTED_DOMAINS = ("", "ai.onnx", "com.microsoft")
MIN_OPSET = 13
KNOWN_CONST_LIMIT = 1024  # initializers up to this many elements are also known at import time


def import_onnx(path, *, shapes: dict[str, tuple] | None = None) -> Module:
    """Import an ONNX model file as a slimgraph Module with one entry function ``main``."""
    source = os.fspath(path)
    model = load_model(source)
    opset = default_opset(model, source)
    model_dir = os.path.dirname(os.path.abspath(source))
    check_external_locations(model, model_dir, source)
    graph = model.graph
    if len(graph.sparse_initializer):
        raise UnsupportedError(f"{source}: sparse initializers are not supported")
    init_names = {t.name for t in graph.initializer}
    graph_inputs = [i for i in graph.input if i.name not in init_names]
    order = topo_sort(graph, {i.name for i in graph_inputs} | init_names, source)
    check_supported(order, source)

    state = ImportState(source, opset)
    add_params(state, graph_inputs, shapes or {})
    add_initializers(state, graph.initializer, model_dir)
    consumed = {name for _, node in order for name in node.input} | {o.name for o in graph.output}
    read_attr = _attr_reader(model_dir, source)
    for index, node in order:
        convert_node(state, NodeContext(state, node, display_name(node, index), read_attr), consumed)
    state.builder.output(*[_output_ref(state, o.name, read_attr) for o in graph.output])
    fn = state.builder.build()
    used = fn.weight_refs()
    weights = {name: w for name, w in state.weights.items() if name in used}
    metadata = {"source": source, "frontend": "onnx", "opset": str(opset), "producer": model.producer_name}
    return Module({"main": fn}, weights, metadata)


# ----------------------------------------------------------------------------- loading
def load_model(path: str) -> onnx.ModelProto:
    """Parse the protobuf only (external data is resolved by slimgraph, see onnx_weights)."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such ONNX file" if not os.path.exists(path) else f"{path}: not a file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, RuntimeError, ... for truncated or garbage bytes
        raise ModelLoadError(f"{path}: not a readable ONNX model (truncated or corrupt?): "
                             f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not len(model.graph.output):
        raise ModelLoadError(f"{path}: not an ONNX model (no IR version, graph or graph outputs)")
    return model


def default_opset(model: onnx.ModelProto, source: str) -> int:
    versions = {o.domain: o.version for o in model.opset_import}
    version = versions.get("", versions.get("ai.onnx"))
    if version is None:
        raise ModelLoadError(f"{source}: the model declares no opset for the default ONNX domain")
    newest = onnx.defs.onnx_opset_version()
    if version < MIN_OPSET or version > newest:
        raise UnsupportedError(f"{source}: opset {version} is not supported (slimgraph reads {MIN_OPSET}..{newest})",
                               hint="convert it with onnx.version_converter.convert_version(model, 17)")
    return version


def display_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


# ----------------------------------------------------------------------------- structure
def topo_sort(graph: onnx.GraphProto, available: set[str], source: str) -> list[tuple[int, onnx.NodeProto]]:
    """Kahn's algorithm keeping the file order among ready nodes; names the culprit on failure."""
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for out in filter(None, node.output):
            if out in producer or out in available:
                raise GraphStructureError(f"{source}: tensor {out!r} is defined twice "
                                          f"(again by node {display_name(node, index)!r})")
            producer[out] = index
    waiting_on: list[set[int]] = []
    for index, node in enumerate(nodes):
        deps = set()
        for name in filter(None, node.input):
            if name not in producer and name not in available:
                raise GraphStructureError(f"{source}: node {display_name(node, index)!r} ({node.op_type}) "
                                          f"uses undefined tensor {name!r}")
            if name in producer:
                deps.add(producer[name])
        waiting_on.append(deps)
    for out in graph.output:
        if out.name not in producer and out.name not in available:
            raise GraphStructureError(f"{source}: graph output {out.name!r} is not produced by any node")
    return _kahn(nodes, waiting_on, producer, source)


def _kahn(nodes, waiting_on, producer, source):
    users: dict[int, list[int]] = {}
    for index, deps in enumerate(waiting_on):
        for dep in deps:
            users.setdefault(dep, []).append(index)
    pending = [len(deps) for deps in waiting_on]
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append((index, nodes[index]))
        for user in users.get(index, ()):
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, user)
    if len(order) < len(nodes):
        raise GraphStructureError(_cycle_message(nodes, pending, producer, source))
    return order


def _cycle_message(nodes, pending, producer, source) -> str:
    """Walk back from a stuck node along stuck producers until a node repeats: that is a cycle."""
    stuck = {i for i, n in enumerate(pending) if n > 0}
    index, path, edges = min(stuck), [], {}
    while index not in path:
        path.append(index)
        tensor = next(t for t in nodes[index].input if t in producer and producer[t] in stuck)
        edges[index] = tensor
        index = producer[tensor]
    cycle = path[path.index(index):]
    steps = " -> ".join(f"{display_name(nodes[i], i)!r} (uses {edges[i]!r})" for i in cycle)
    return f"{source}: the graph has a cycle: node {steps} -> {display_name(nodes[index], index)!r}"


def check_supported(order, source: str) -> None:
    missing: dict[str, tuple[int, str]] = {}
    for index, node in order:
        key = node.op_type if node.domain in SUPPORTED_DOMAINS else f"{node.domain}::{node.op_type}"
        if key not in CONVERTERS:
            count, example = missing.get(key, (0, display_name(node, index)))
            missing[key] = (count + 1, example)
    if missing:
        raise UnsupportedOpsError(source, missing)


# ----------------------------------------------------------------------------- inputs and weights
def _symbol(name: str) -> str:
    return sanitize_name(name).replace(".", "_")


def _declared_dims(value_info: onnx.ValueInfoProto, source: str) -> tuple:
    tensor_type = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        raise UnsupportedError(f"{source}: input {value_info.name!r} is not a tensor of known rank")
    return tuple(d.dim_value if d.HasField("dim_value") else _symbol(d.dim_param or f"{value_info.name}_dim{i}")
                 for i, d in enumerate(tensor_type.shape.dim))


def bind_shapes(declared: dict[str, tuple], shapes: dict[str, tuple], source: str) -> dict[str, tuple]:
    """Apply user-fixed shapes: each symbol a given input binds is replaced in every input."""
    unknown = sorted(set(shapes) - set(declared))
    if unknown:
        raise ShapeSpecError(f"{source}: shapes given for unknown input(s) {unknown}; inputs are {sorted(declared)}")
    binding: dict[str, object] = {}
    for name, given in shapes.items():
        dims = declared[name]
        if len(given) != len(dims):
            raise ShapeSpecError(f"{source}: input {name!r} has rank {len(dims)} {list(dims)}, shape {tuple(given)} given")
        for dim, value in zip(dims, given):
            value = _symbol(value) if isinstance(value, str) else int(value)
            if isinstance(dim, int):
                if value != dim:
                    raise ShapeSpecError(f"{source}: input {name!r} has static dim {dim}, {value} given")
            elif binding.setdefault(dim, value) != value:
                raise ShapeSpecError(f"{source}: dim {dim!r} fixed to both {binding[dim]} and {value}")
    return {name: tuple(binding.get(d, d) if isinstance(d, str) else d for d in dims)
            for name, dims in declared.items()}


def add_params(state: ImportState, graph_inputs, shapes: dict) -> None:
    declared = {i.name: _declared_dims(i, state.source) for i in graph_inputs}
    bound = bind_shapes(declared, shapes, state.source)
    for value_info in graph_inputs:
        dtype = ir_dtype(value_info.type.tensor_type.elem_type, f"{state.source}: input {value_info.name!r}")
        tensor_type = TensorType(dtype, bound[value_info.name])
        state.values[value_info.name] = Val(tensor_type, ref=state.builder.param(value_info.name, tensor_type))


def add_initializers(state: ImportState, initializers, model_dir: str) -> None:
    for tensor in initializers:
        array = tensor_to_array(tensor, model_dir, state.source)
        check_finite(tensor.name, array, state.source)
        ref = state.add_weight(tensor.name, array)
        known = array if array.size <= KNOWN_CONST_LIMIT else None
        state.values[tensor.name] = Val(TensorType.of(array), ref=ref, const=known)


def _attr_reader(model_dir: str, source: str):
    def read(proto: onnx.AttributeProto, ctx: NodeContext):
        if proto.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise UnsupportedError(f"{ctx.where}: subgraph attribute {proto.name!r} is not supported")
        if proto.type == onnx.AttributeProto.TENSOR:
            return tensor_to_array(proto.t, model_dir, source, what=f"node {ctx.name!r} attribute")
        value = onnx.helper.get_attribute_value(proto)
        if isinstance(value, bytes):
            return value.decode()
        return [v.decode() for v in value] if isinstance(value, list) and value and isinstance(value[0], bytes) else value

    return read


# ----------------------------------------------------------------------------- conversion
def convert_node(state: ImportState, ctx: NodeContext, consumed: set[str]) -> None:
    """Run the node's converter and bind its outputs; unexpected failures name the node."""
    try:
        result = CONVERTERS[ctx.op_type](ctx)
    except SlimgraphError:
        raise
    except Exception as exc:
        raise InternalError(f"{ctx.where}: cannot convert the node (malformed node or slimgraph bug): "
                            f"{type(exc).__name__}: {exc}") from exc
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    for i, out in enumerate(ctx.node.output):
        if i < len(results):
            state.values[out] = results[i]
        elif out and out in consumed:
            raise UnsupportedError(f"{ctx.where}: output {i} ({out!r}) is used, but slimgraph only provides "
                                   f"the first {len(results)} output(s) of {ctx.op_type}")


def _output_ref(state: ImportState, name: str, read_attr) -> str:
    """The IR value of a graph output (known tensors are materialized; weights get a view node)."""
    node = onnx.helper.make_node("Identity", [name], [name], name=f"graph output {name}")
    ctx = NodeContext(state, node, node.name, read_attr)
    val = state.values[name]
    ref = ctx.ref(val)
    if ref.startswith("@"):
        ref = state.builder.add(ops.RESHAPE, [ref], {"shape": val.shape}, name=name)
    return ref


__all__ = ["import_onnx", "load_model", "topo_sort", "bind_shapes"]

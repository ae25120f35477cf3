"""Deterministic text form of a module, and its parser: ``parse(print_module(m))`` prints the same text.

Weights are shown by name, type and a short content hash, never by value::

    weight @model.embed.weight : f32[49152,576] #3f2a9c01d4e7

    func @main(%input_ids: i64[1,T]) -> (f32[1,T,576]) {
      %h = take(@model.embed.weight, %input_ids) : f32[1,T,576]
      %y = call(%h) {callee="fused_rms_norm_0"} : f32[1,T,576]
      return %y
    }

Attributes equal to their default are omitted. Floats print with ``repr`` so they round-trip.
"""

from __future__ import annotations

import json
import math
import re

from slimgraph.compiler.errors import IRParseError
from slimgraph.compiler.ir import Function, FunctionKind, Module, Node, Param, Weight
from slimgraph.compiler.ops import OPS, AttrKind, OpDef
from slimgraph.compiler.types import DType, TensorType, parse_dim

HEADER = "# slimgraph IR v1"


# ----------------------------------------------------------------------------- printing
def format_attr(kind: AttrKind, value) -> str:
    if kind is AttrKind.BOOL:
        return "true" if value else "false"
    if kind is AttrKind.FLOAT:
        return repr(float(value)) if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
    if kind is AttrKind.STR:
        return json.dumps(value)
    if kind in (AttrKind.INTS, AttrKind.DIMS):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def format_attrs(node: Node) -> str:
    parts = []
    for spec, (name, value) in zip(node.op.attrs, node.attrs.items()):
        if not spec.required and value == spec.default:
            continue
        parts.append(f"{name}={format_attr(spec.kind, value)}")
    return " {" + ", ".join(parts) + "}" if parts else ""


def format_ref(ref: str) -> str:
    return ref if ref.startswith("@") else f"%{ref}"


def format_node(node: Node) -> str:
    args = ", ".join(format_ref(i) for i in node.inputs)
    return f"%{node.name} = {node.op.name}({args}){format_attrs(node)} : {node.type}"


def format_function(fn: Function) -> str:
    params = ", ".join(f"%{p.name}: {p.type}" for p in fn.params)
    results = ", ".join(str(t) for t in fn.output_types())
    lines = [f"{fn.kind.value} @{fn.name}({params}) -> ({results}) {{"]
    lines += [f"  {format_node(n)}" for n in fn.nodes]
    lines.append("  return " + ", ".join(format_ref(o) for o in fn.outputs))
    lines.append("}")
    return "\n".join(lines)


def print_module(module: Module) -> str:
    lines = [HEADER]
    for key in sorted(module.metadata):
        lines.append(f"meta {key} = {json.dumps(module.metadata[key])}")
    if module.metadata:
        lines.append("")
    for name in sorted(module.weights):
        w = module.weights[name]
        lines.append(f"weight @{name} : {w.type} #{w.digest}")
    if module.weights:
        lines.append("")
    lines.append("\n\n".join(format_function(f) for f in module.functions.values()))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- parsing
_WEIGHT_RE = re.compile(r"^weight @(\S+) : (\S+) #([0-9a-f]+)$")
_META_RE = re.compile(r"^meta (\S+) = (.*)$")
_FUNC_RE = re.compile(r"^(func|fused) @(\S+)\((.*)\) -> \((.*)\) \{$")
_NODE_RE = re.compile(r"^%(\S+) = ([a-z0-9_]+)\((.*?)\)(?: \{(.*)\})? : (\S+)$")
_RETURN_RE = re.compile(r"^return (.*)$")


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or strings."""
    parts, depth, quoted, current = [], 0, False, []
    for ch in text:
        if ch == '"' and (not current or current[-1] != "\\"):
            quoted = not quoted
        elif not quoted and ch in "[(":
            depth += 1
        elif not quoted and ch in "])":
            depth -= 1
        if ch == "," and depth == 0 and not quoted:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def parse_attr(kind: AttrKind, text: str):
    text = text.strip()
    if kind is AttrKind.BOOL:
        return {"true": True, "false": False}[text]
    if kind is AttrKind.FLOAT:
        return float(text)
    if kind is AttrKind.INT:
        return int(text)
    if kind is AttrKind.STR:
        return json.loads(text)
    if kind is AttrKind.DTYPE:
        return DType(text)
    if kind is AttrKind.DIM:
        return parse_dim(text)
    inner = text[1:-1].strip()
    items = split_top_level(inner) if inner else []
    return tuple(int(v) for v in items) if kind is AttrKind.INTS else tuple(parse_dim(v) for v in items)


def _parse_attrs(op: OpDef, text: str | None) -> dict:
    if not text:
        return {}
    kinds = {s.name: s.kind for s in op.attrs}
    out = {}
    for item in split_top_level(text):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in kinds:
            raise ValueError(f"op {op.name} has no attribute {key}")
        out[key] = parse_attr(kinds[key], value)
    return out


def _parse_ref(text: str) -> str:
    text = text.strip()
    if text.startswith("%"):
        return text[1:]
    if text.startswith("@"):
        return text
    raise ValueError(f"expected %value or @weight, got {text!r}")


class _Parser:
    def __init__(self, text: str, source: str, weights: dict | None):
        self.lines = text.splitlines()
        self.source = source
        self.data = weights or {}
        self.weights: dict[str, Weight] = {}
        self.meta: dict[str, str] = {}
        self.functions: dict[str, Function] = {}

    def error(self, lineno: int, message: str) -> IRParseError:
        return IRParseError(f"{self.source}:{lineno + 1}: {message}")

    def run(self) -> Module:
        i = 0
        while i < len(self.lines):
            line = self.lines[i].strip()
            if not line or line.startswith("#"):
                i += 1
            elif m := _META_RE.match(line):
                self.meta[m.group(1)] = json.loads(m.group(2))
                i += 1
            elif m := _WEIGHT_RE.match(line):
                self._weight(i, m)
                i += 1
            elif m := _FUNC_RE.match(line):
                i = self._function(i, m)
            else:
                raise self.error(i, f"cannot parse line: {line!r}")
        return Module(self.functions, self.weights, self.meta)

    def _weight(self, i, m):
        name, type_text, digest = m.groups()
        try:
            wtype = TensorType.parse(type_text)
        except ValueError as exc:
            raise self.error(i, str(exc)) from None
        array = self.data.get(name)
        self.weights[name] = Weight(array, type=wtype, digest=None if array is not None else digest)
        if array is not None and self.weights[name].digest != digest:
            raise self.error(i, f"weight @{name} data does not match digest #{digest}")

    def _function(self, i, m) -> int:
        kind, name, params_text, _results = m.groups()
        params = []
        for p in split_top_level(params_text):
            pname, _, ptype = p.partition(":")
            params.append(Param(_parse_ref(pname), TensorType.parse(ptype)))
        nodes, outputs = [], ()
        i += 1
        while i < len(self.lines):
            line = self.lines[i].strip()
            if line == "}":
                break
            if r := _RETURN_RE.match(line):
                outputs = tuple(_parse_ref(x) for x in split_top_level(r.group(1)))
            else:
                nodes.append(self._node(i, line))
            i += 1
        else:
            raise self.error(i - 1, f"function @{name} is not closed by '}}'")
        fkind = FunctionKind.ENTRY if kind == "func" else FunctionKind.FUSED
        self.functions[name] = Function(name, tuple(params), tuple(nodes), outputs, fkind)
        return i + 1

    def _node(self, i, line) -> Node:
        m = _NODE_RE.match(line)
        if not m:
            raise self.error(i, f"cannot parse node: {line!r}")
        name, opname, args, attrs_text, type_text = m.groups()
        op = OPS.get(opname)
        if op is None:
            raise self.error(i, f"unknown op {opname!r}")
        try:
            inputs = tuple(_parse_ref(a) for a in split_top_level(args)) if args.strip() else ()
            attrs = op.make_attrs(_parse_attrs(op, attrs_text))
            ntype = TensorType.parse(type_text)
        except (ValueError, KeyError, TypeError) as exc:
            raise self.error(i, str(exc)) from None
        return Node(name, op, inputs, attrs, ntype)


def parse_module(text: str, *, source: str = "<ir>", weights: dict | None = None) -> Module:
    """Parse IR text. Weight data may be supplied by name; otherwise weights are type-only."""
    return _Parser(text, source, weights).run()

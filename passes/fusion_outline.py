"""Outlining for operator fusion: turn each group of an entry function into a FUSED function.

For a group (members in program order, root = its only escaping value):

* its *external inputs* -- values and weights read by members but defined outside -- become the
  params ``p0, p1, ...`` in first-use order; weights are passed as ``@name`` call arguments, so a
  body never references a weight and identical layers with different weights share a body;
* static source ops it reads (scalar constants, fixed aranges) are cloned into the body, unless
  the group reads nothing else (a call needs an argument: then they are params);
* body values are named after their ops (``matmul``, ``add``, ``add_1``), so the text of a body
  depends only on its structure. Two groups with the same param types and the same body are one
  function. Names come from the ops, anchor first: ``fused_matmul_add_gelu``, then ``_1``, ``_2``.

The entry keeps the root's value name for the ``call`` node, so nothing downstream is renamed.
"""

from __future__ import annotations

from dataclasses import replace

from slimgraph.compiler.ir import Function, FunctionBuilder, FunctionKind, Module, Node
from slimgraph.compiler.ops import CALL, OpCategory

MAX_NAME_OPS = 4


def structural_key(fn: Function) -> tuple:
    """Identity of a fused function up to its name."""
    body = tuple((n.op.name, n.inputs, n.attrs, n.type) for n in fn.nodes)
    return (tuple(p.type for p in fn.params), body, fn.outputs)


def base_name(members: list[Node], anchor: Node | None) -> str:
    names: list[str] = [anchor.op.name] if anchor is not None else []
    for node in members:
        if node.op.name not in names:
            names.append(node.op.name)
    return "fused_" + "_".join(names[:MAX_NAME_OPS])


def is_static_source(node: Node | None) -> bool:
    return node is not None and node.op.category is OpCategory.SOURCE and node.type.is_static


class Outliner:
    """Outlines groups of every entry of ``module``, sharing functions across entries."""

    def __init__(self, module: Module):
        self.module = module
        self.known = {structural_key(f): name for name, f in module.functions.items()
                      if f.kind is FunctionKind.FUSED}
        self.taken = set(module.functions)
        self.created: dict[str, Function] = {}
        self.stats = {"calls": 0, "ops_fused": 0, "functions_created": 0, "functions_shared": 0}

    def outline(self, fn: Function, groups: list) -> Function:
        nodes = fn.node_map()
        types = fn.value_types(self.module)
        member_of = {m for g in groups for m in g.members}
        calls, cloned = {}, set()
        for group in groups:
            calls[group.root] = self.call_for(group, fn, nodes, types, cloned)
        kept = [n for n in fn.nodes if n.name not in member_of]
        needed = set(fn.outputs)
        for node in list(calls.values()) + kept:
            needed.update(node.inputs)
        out = []
        for node in fn.nodes:
            if node.name in calls:
                out.append(calls[node.name])
            elif node.name not in member_of and (node.name in needed or node.name not in cloned):
                out.append(node)
        return replace(fn, nodes=tuple(out))

    def call_for(self, group, fn: Function, nodes: dict, types: dict, cloned: set) -> Node:
        order = {n.name: i for i, n in enumerate(fn.nodes)}
        members = [nodes[m] for m in sorted(group.members, key=order.__getitem__)]
        externals: list[str] = []
        sources: list[str] = []
        for node in members:
            for ref in node.inputs:
                if ref in group.members or ref in externals or ref in sources:
                    continue
                (sources if is_static_source(nodes.get(ref)) else externals).append(ref)
        if externals:
            cloned.update(sources)
        else:   # a call needs an argument: a group of constants reads its sources as params
            externals = sources
        body = self.body(group, members, externals, nodes, types)
        name = self.function_for(body, base_name(members, group.anchor))
        self.stats["calls"] += 1
        self.stats["ops_fused"] += len(members)
        attrs = CALL.make_attrs({"callee": name})
        return Node(group.root, CALL, tuple(externals), attrs, nodes[group.root].type)

    @staticmethod
    def body(group, members: list[Node], externals: list[str], nodes: dict, types: dict) -> Function:
        b = FunctionBuilder("", kind=FunctionKind.FUSED)
        rename = {ref: b.param(f"p{i}", types[ref]) for i, ref in enumerate(externals)}
        for node in members:
            for ref in node.inputs:
                if ref not in rename:   # a cloned static source
                    src = nodes[ref]
                    rename[ref] = b.add(src.op, (), dict(src.attrs.items()), name=src.op.name, type=src.type)
            rename[node.name] = b.add(node.op, [rename[r] for r in node.inputs], dict(node.attrs.items()),
                                      name=node.op.name, type=node.type)
        b.output(rename[group.root])
        return b.build()

    def function_for(self, body: Function, base: str) -> str:
        key = structural_key(body)
        if key in self.known:
            self.stats["functions_shared"] += 1
            return self.known[key]
        name, n = base, 0
        while name in self.taken:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        self.known[key] = name
        self.created[name] = replace(body, name=name)
        self.stats["functions_created"] += 1
        return name

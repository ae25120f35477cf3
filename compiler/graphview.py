"""Derived views of a function for analyses (networkx)."""

from __future__ import annotations

import networkx as nx

from slimgraph.compiler.ir import Function


def to_networkx(fn: Function) -> nx.DiGraph:
    """A DiGraph with one vertex per param, weight and node; edges follow data flow.
    Vertex attributes: ``kind`` (param/weight/node), ``op`` and ``type``."""
    g = nx.DiGraph(name=fn.name)
    for p in fn.params:
        g.add_node(p.name, kind="param", op=None, type=str(p.type))
    for n in fn.nodes:
        g.add_node(n.name, kind="node", op=n.op.name, type=str(n.type))
        for i in n.inputs:
            if i.startswith("@") and i not in g:
                g.add_node(i, kind="weight", op=None, type=None)
            g.add_edge(i, n.name)
    return g

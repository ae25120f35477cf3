"""A self-contained HTML picture of a module's entry function (``slimgraph inspect --html``).

Layout: each value sits in the row of its topological generation (networkx), so data flows top to
bottom. A call to a fused function is drawn as a box listing the ops fused into that one kernel.
The page is a single file: inline SVG and CSS, no scripts or external resources.
"""

from __future__ import annotations

import html
from pathlib import Path

import networkx as nx

from slimgraph.compiler.graphview import to_networkx
from slimgraph.compiler.ir import Module

ROW_H, COL_W, BOX_W, LINE_H = 70, 230, 210, 14
COLORS = {"contraction": "#f4a261", "normalization": "#8ecae6", "reduction": "#90be6d", "elementwise": "#e9ecef",
          "layout": "#cdb4db", "source": "#ffe5a3", "param": "#b7e4c7", "weight": "#f1faee"}


def _box(module: Module, nodes: dict, g: nx.DiGraph, vertex: str) -> tuple[str, list[str], str]:
    """(title, lines, color) for one vertex."""
    data = g.nodes[vertex]
    if data["kind"] != "node":
        return vertex, [data.get("type") or ""], COLORS[data["kind"]]
    node = nodes[vertex]
    if node.callee:
        body = module.functions[node.callee]
        return f"{node.callee}", [n.op.name for n in body.nodes] + [str(node.type)], "#ffffff"
    return f"{node.op.name}", [vertex, str(node.type)], COLORS.get(node.op.category.value, "#e9ecef")


def render_svg(module: Module) -> str:
    fn = module.main
    g = to_networkx(fn)
    nodes = fn.node_map()
    g.remove_nodes_from([v for v, d in list(g.nodes(data=True)) if d["kind"] == "weight"])
    rows = list(nx.topological_generations(g))
    positions, y = {}, 20
    boxes = {}
    for row in rows:
        row_h = 0
        for col, vertex in enumerate(sorted(row)):
            title, lines, color = _box(module, nodes, g, vertex)
            h = LINE_H * (len(lines) + 1) + 10
            boxes[vertex] = (title, lines, color, h)
            positions[vertex] = (20 + col * COL_W, y)
            row_h = max(row_h, h)
        y += row_h + ROW_H - 40
    width = 40 + COL_W * max((len(r) for r in rows), default=1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 20}">']
    for a, b in g.edges():
        (xa, ya), (xb, yb) = positions[a], positions[b]
        parts.append(f'<line x1="{xa + BOX_W / 2}" y1="{ya + boxes[a][3]}" x2="{xb + BOX_W / 2}" y2="{yb}" '
                     'stroke="#888" stroke-width="1"/>')
    for vertex, (x, yy) in positions.items():
        title, lines, color, h = boxes[vertex]
        fused = nodes.get(vertex)
        dash = ' stroke-dasharray="5,3" stroke-width="2"' if fused is not None and fused.callee else ""
        parts.append(f'<g><rect x="{x}" y="{yy}" width="{BOX_W}" height="{h}" rx="4" fill="{color}" '
                     f'stroke="#333"{dash}/>')
        parts.append(f'<text x="{x + 6}" y="{yy + 14}" class="t">{html.escape(title[:28])}</text>')
        for i, line in enumerate(lines):
            parts.append(f'<text x="{x + 6}" y="{yy + 14 + LINE_H * (i + 1)}">{html.escape(line[:30])}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


def write_html(module: Module, path: str | Path, *, title: str = "slimgraph") -> None:
    fused = sum(1 for n in module.main.nodes if n.callee)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} text{{font:11px monospace}} text.t{{font-weight:bold}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>@{html.escape(module.main.name)}: {len(module.main.nodes)} nodes, {fused} fused kernels (dashed boxes list the
ops fused into one kernel).</p>
{render_svg(module)}
</body></html>
"""
    Path(path).write_text(page)

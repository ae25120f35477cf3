"""Fix symbolic dims to sizes the user gives (``--shape input_ids=1x128``).

Each given input shape is matched against the entry parameter's type to bind its symbols
(``i64[1,T]`` with ``1x128`` binds T=128); every type and dim attribute of every function is then
rewritten with those bindings, so later passes and the build see static shapes.
"""

from __future__ import annotations

from dataclasses import replace

import sympy

from slimgraph.compiler.errors import ShapeSpecError
from slimgraph.compiler.ir import Function, Module, Node, Param
from slimgraph.compiler.ops import AttrKind, Attrs
from slimgraph.compiler.types import TensorType, canonical_dim, dim_expr, dim_symbols


def parse_shape_specs(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """``["input_ids=1x128"]`` -> ``{"input_ids": (1, 128)}``."""
    out = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name.strip()] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise ShapeSpecError(f"bad --shape {spec!r}; expected NAME=D0xD1x..., e.g. input_ids=1x128") from None
    return out


def bind_from_shapes(module: Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    params = {p.name: p for fn in module.entries for p in fn.params}
    env: dict[str, int] = {}
    for name, dims in shapes.items():
        if name not in params:
            raise ShapeSpecError(f"--shape names {name!r}, but the model's inputs are {sorted(params)}")
        ptype = params[name].type
        if len(dims) != ptype.rank:
            raise ShapeSpecError(f"--shape {name}: {len(dims)} dims given, input is {ptype}")
        for dim, size in zip(ptype.shape, dims):
            if isinstance(dim, int):
                if dim != size:
                    raise ShapeSpecError(f"--shape {name}: dim {dim} of {ptype} is fixed, {size} given")
            elif dim_expr(dim).is_Symbol:
                if env.setdefault(dim, size) != size:
                    raise ShapeSpecError(f"--shape {name}: {dim} is bound to both {env[dim]} and {size}")
    return env


def _subst(dim, env):
    if isinstance(dim, int):
        return dim
    if not dim_symbols(dim) & set(env):
        return dim
    expr = dim_expr(dim).subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in env.items()})
    return canonical_dim(expr)


def _subst_type(t: TensorType, env) -> TensorType:
    return t.with_shape(tuple(_subst(d, env) for d in t.shape))


def _subst_node(node: Node, env) -> Node:
    items = []
    for spec, (key, value) in zip(node.op.attrs, node.attrs.items()):
        if spec.kind is AttrKind.DIM:
            value = _subst(value, env)
        elif spec.kind is AttrKind.DIMS:
            value = tuple(_subst(d, env) for d in value)
        items.append((key, value))
    return replace(node, attrs=Attrs(tuple(items)), type=_subst_type(node.type, env))


def specialize(module: Module, env: dict[str, int]) -> Module:
    """Return a module where the symbols in ``env`` are replaced by their sizes."""
    if not env:
        return module
    functions = {}
    for name, fn in module.functions.items():
        params = tuple(Param(p.name, _subst_type(p.type, env)) for p in fn.params)
        nodes = tuple(_subst_node(n, env) for n in fn.nodes)
        functions[name] = Function(fn.name, params, nodes, fn.outputs, fn.kind)
    return module.with_functions(functions)

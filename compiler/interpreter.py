"""Reference interpreter: runs any function of a module with the ops' numpy implementations.

It is the numerical ground truth for ``--verify`` and for tests. Symbolic dims are bound from the
shapes of the actual inputs (``T`` = 7 when ``%input_ids: i64[1,T]`` gets a 1x7 array).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from slimgraph.compiler.errors import RuntimeInputError
from slimgraph.compiler.ir import Function, Module
from slimgraph.compiler.ops import CALL, RefContext
from slimgraph.compiler.types import dim_expr, eval_dim


def bind_symbols(fn: Function, arrays: Sequence[np.ndarray], env: dict | None = None) -> dict[str, int]:
    """Solve each param's symbolic dims from the given arrays (dims that are plain symbols first)."""
    env = dict(env or {})
    pending = []
    for param, arr in zip(fn.params, arrays):
        if arr.ndim != param.type.rank:
            raise RuntimeInputError(f"input %{param.name}: expected rank {param.type.rank} ({param.type}), "
                                    f"got shape {tuple(arr.shape)}")
        for dim, actual in zip(param.type.shape, arr.shape):
            if isinstance(dim, str) and dim_expr(dim).is_Symbol:
                if env.setdefault(dim, int(actual)) != actual:
                    raise RuntimeInputError(f"input %{param.name}: dim {dim} is {actual} here but "
                                            f"{env[dim]} in another input")
            pending.append((param, dim, actual))
    for param, dim, actual in pending:
        if eval_dim(dim, env) != actual:
            raise RuntimeInputError(f"input %{param.name}: expected {param.type} with {_env_text(env)}, "
                                    f"got a dim of {actual} where {dim} is required")
    return env


def _env_text(env):
    return ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "no symbols"


def check_inputs(fn: Function, arrays: Sequence[np.ndarray]) -> dict[str, int]:
    if len(arrays) != len(fn.params):
        raise RuntimeInputError(f"@{fn.name} takes {len(fn.params)} input(s) "
                                f"({', '.join(p.name for p in fn.params)}), got {len(arrays)}")
    for param, arr in zip(fn.params, arrays):
        if arr.dtype != param.type.dtype.numpy:
            raise RuntimeInputError(f"input %{param.name}: expected dtype {param.type.dtype} "
                                    f"({param.type}), got {arr.dtype}")
    return bind_symbols(fn, arrays)


def run_function(module: Module, fn: Function, arrays: Sequence[np.ndarray], *,
                 env: dict | None = None, keep: bool = False) -> list[np.ndarray] | dict[str, np.ndarray]:
    """Evaluate ``fn``. With ``keep=True`` returns every intermediate value by name."""
    env = check_inputs(fn, arrays) if env is None else env
    values: dict[str, np.ndarray] = {p.name: a for p, a in zip(fn.params, arrays)}
    remaining = _last_uses(fn) if not keep else {}
    for i, node in enumerate(fn.nodes):
        ins = [module.weights[r[1:]].array if r.startswith("@") else values[r] for r in node.inputs]
        if node.op is CALL:
            callee = module.functions[node.callee]
            out = run_function(module, callee, ins, env=env)[0]
        else:
            ctx = RefContext(node.type.concrete(env), node.type.dtype, env)
            out = node.op.reference(ins, node.attrs, ctx)
        values[node.name] = np.asarray(out)
        for dead in remaining.get(i, ()):
            values.pop(dead, None)
    if keep:
        return values
    return [values[o] for o in fn.outputs]


def _last_uses(fn: Function) -> dict[int, list[str]]:
    """Free intermediates after their last use so large models fit in memory."""
    last: dict[str, int] = {}
    for i, node in enumerate(fn.nodes):
        for ref in node.inputs:
            if not ref.startswith("@"):
                last[ref] = i
    keep = set(fn.outputs)
    out: dict[int, list[str]] = {}
    for name, i in last.items():
        if name not in keep:
            out.setdefault(i, []).append(name)
    return out


def run(module: Module, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray], *, function: str | None = None):
    """Run an entry function (default: the first) on inputs given by name or position."""
    fn = module.functions[function] if function else module.main
    if isinstance(inputs, Mapping):
        missing = [p.name for p in fn.params if p.name not in inputs]
        if missing:
            raise RuntimeInputError(f"@{fn.name}: missing input(s) {missing}")
        arrays = [np.asarray(inputs[p.name]) for p in fn.params]
    else:
        arrays = [np.asarray(a) for a in inputs]
    return run_function(module, fn, arrays)

"""Reference interpreter: runs any function of a module with the ops' numpy implementations.

It is the numerical ground truth for ``--verify`` and for tests. Symbolic dims are bound from the
shapes of the actual inputs (``T`` = 7 when ``%input_ids: i64[1,T]`` gets a 1x7 array).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from slimgraph.compiler.errors import RuntimeInputError
from slimgraph.compiler.ir import Function, Module
from slimgraph.compiler.ops import CALL, RefContext
from slimgraph.compiler.types import TensorType, dim_expr


def check_input_arrays(signature: Sequence[tuple[str, TensorType]], arrays: Sequence[np.ndarray],
                       where: str = "") -> dict[str, int]:
    """Check arrays against (name, type) pairs: count, dtype, rank, then shapes once every
    symbolic dim that stands alone in some input (``T`` in ``i64[1,T]``) is bound. Returns the
    bindings. Shared by the interpreter and the compiled-artifact runner."""
    if len(arrays) != len(signature):
        names = [name for name, _ in signature]
        raise RuntimeInputError(f"{where}takes {len(signature)} input(s) {names}, got {len(arrays)}")
    env: dict[str, int] = {}
    for (name, ttype), arr in zip(signature, arrays):
        if arr.dtype != ttype.dtype.numpy:
            raise RuntimeInputError(f"input {name!r}: expected dtype {ttype.dtype} ({ttype}), got {arr.dtype}")
        if arr.ndim != ttype.rank:
            raise RuntimeInputError(f"input {name!r}: expected rank {ttype.rank} ({ttype}), "
                                    f"got shape {list(arr.shape)}")
        for dim, actual in zip(ttype.shape, arr.shape):
            if isinstance(dim, str) and dim_expr(dim).is_Symbol and env.setdefault(dim, int(actual)) != actual:
                raise RuntimeInputError(f"input {name!r}: dim {dim}={actual} disagrees with {dim}={env[dim]} "
                                        "of an earlier input")
    for (name, ttype), arr in zip(signature, arrays):
        want = ttype.concrete(env)
        if tuple(arr.shape) != want:
            raise RuntimeInputError(f"input {name!r}: expected shape {ttype} = {list(want)}, got {list(arr.shape)}")
    return env


def check_inputs(fn: Function, arrays: Sequence[np.ndarray]) -> dict[str, int]:
    return check_input_arrays([(p.name, p.type) for p in fn.params], arrays, where=f"@{fn.name} ")


def run_function(module: Module, fn: Function, arrays: Sequence[np.ndarray], *,
                 env: dict | None = None, keep: bool = False,
                 observe: Callable[[str, np.ndarray], None] | None = None) -> list[np.ndarray] | dict[str, np.ndarray]:
    """Evaluate ``fn``. With ``keep=True`` returns every intermediate value by name; ``observe(name,
    value)`` sees each value of ``fn`` as it is computed (calibration statistics)."""
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
        if observe is not None:
            observe(node.name, values[node.name])
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


def run(module: Module, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray], *, function: str | None = None,
        observe: Callable[[str, np.ndarray], None] | None = None):
    """Run an entry function (default: the first) on inputs given by name or position."""
    fn = module.functions[function] if function else module.main
    if isinstance(inputs, Mapping):
        missing = [p.name for p in fn.params if p.name not in inputs]
        if missing:
            raise RuntimeInputError(f"@{fn.name}: missing input(s) {missing}")
        arrays = [np.asarray(inputs[p.name]) for p in fn.params]
    else:
        arrays = [np.asarray(a) for a in inputs]
    return run_function(module, fn, arrays, observe=observe)

"""Lowering of slimgraph IR to a TVM Relax IRModule.

* Every entry function becomes a Relax function whose parameters are its inputs followed by the
  weights it uses (``attrs["num_input"]`` marks the split), so weights stay out of the library and
  are bound at load time from the artifact's safetensors.
* Every fused function becomes a private Relax function marked ``Primitive``; after
  ``LegalizeOps`` the ``FuseTIR`` pass merges its ops into ONE TIR kernel — fusion is decided by
  slimgraph, not by TVM's FuseOps.
* Symbolic dims (``T``, ``9*T``) become int64 ``tirx.Var`` expressions shared by the whole module.
* Each slimgraph op lowers through :data:`LOWERINGS`, a registry keyed by the op object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import sympy
import tvm
from tvm import relax, tirx

from slimgraph.compiler.errors import UnsupportedOpsError
from slimgraph.compiler.ir import Function, FunctionKind, Module, Node
from slimgraph.compiler.ops import CALL, OpDef
from slimgraph.compiler.types import DType, TensorType, dim_expr

TVM_DTYPES = {
    DType.f16: "float16", DType.f32: "float32", DType.f64: "float64", DType.i8: "int8", DType.u8: "uint8",
    DType.i16: "int16", DType.i32: "int32", DType.i64: "int64", DType.u32: "uint32", DType.bool: "bool",
}


class SymbolTable:
    """One int64 tirx.Var per symbolic dim name, shared across the module."""

    def __init__(self):
        self.vars: dict[str, tirx.Var] = {}

    def var(self, name: str) -> tirx.Var:
        if name not in self.vars:
            self.vars[name] = tirx.Var(name, "int64")
        return self.vars[name]

    def prim(self, dim) -> tirx.PrimExpr:
        if isinstance(dim, int):
            return tirx.IntImm("int64", dim)
        return self._convert(dim_expr(dim))

    def _convert(self, expr: sympy.Expr) -> tirx.PrimExpr:
        if expr.is_Integer:
            return tirx.IntImm("int64", int(expr))
        if expr.is_Symbol:
            return self.var(expr.name)
        if isinstance(expr, sympy.Add):
            return _fold(lambda a, b: a + b, [self._convert(a) for a in expr.args])
        if isinstance(expr, sympy.Mul):
            return _fold(lambda a, b: a * b, [self._convert(a) for a in expr.args])
        if isinstance(expr, sympy.floor):
            num, den = sympy.fraction(sympy.together(expr.args[0]))
            return tirx.floordiv(self._convert(num), self._convert(den))
        raise ValueError(f"cannot express dim {expr} in TVM")

    def shape(self, ttype: TensorType) -> list:
        return [self.prim(d) for d in ttype.shape]

    def relax_type(self, ttype: TensorType) -> relax.TensorType:
        return relax.TensorType(self.shape(ttype), TVM_DTYPES[ttype.dtype])


def _fold(fn, items):
    out = items[0]
    for item in items[1:]:
        out = fn(out, item)
    return out


@dataclass
class LowerContext:
    symbols: SymbolTable
    node: Node
    in_types: list
    builder: relax.BlockBuilder

    def emit(self, expr: relax.Expr) -> relax.Var:
        """Bind an intermediate expression (ops such as reshape need typed operands)."""
        return self.builder.emit(expr)

    def prim(self, dim):
        return self.symbols.prim(dim)

    def out_shape(self):
        return self.symbols.shape(self.node.type)


Lowering = Callable[[LowerContext, list], relax.Expr]
LOWERINGS: dict[OpDef, Lowering] = {}


def lowering(*op_defs: OpDef):
    def deco(fn):
        for op in op_defs:
            LOWERINGS[op] = fn
        return fn

    return deco


@dataclass
class EntrySignature:
    """How to call a lowered entry function: input names/types then weight names."""

    name: str
    inputs: list[tuple[str, str]]
    weights: list[str]
    outputs: list[str] = field(default_factory=list)


@dataclass
class LoweredModule:
    ir_module: tvm.IRModule
    entries: dict[str, EntrySignature]


def check_supported(module: Module) -> None:
    """Raise one UnsupportedOpsError listing every op the backend cannot lower."""
    import slimgraph.backends.relax_cache  # noqa: F401  (registers LOWERINGS)
    import slimgraph.backends.relax_ops  # noqa: F401  (registers LOWERINGS)

    missing: dict[str, tuple[int, str]] = {}
    for fn in module.functions.values():
        for node in fn.nodes:
            if node.op is not CALL and node.op not in LOWERINGS:
                count, example = missing.get(node.op.name, (0, node.name))
                missing[node.op.name] = (count + 1, example)
    if missing:
        raise UnsupportedOpsError("TVM backend", missing)


class _Lowerer:
    def __init__(self, module: Module):
        self.module = module
        self.symbols = SymbolTable()
        self.bb = relax.BlockBuilder()
        self.gvars: dict[str, relax.GlobalVar] = {}

    def run(self) -> LoweredModule:
        check_supported(self.module)
        for fn in self.module.functions.values():
            if fn.kind is FunctionKind.FUSED:
                self._function(fn, weights=[], primitive=True)
        entries = {}
        for fn in self.module.entries:
            weights = sorted(fn.weight_refs())
            self._function(fn, weights=weights, primitive=False)
            entries[fn.name] = EntrySignature(
                fn.name, [(p.name, str(p.type)) for p in fn.params], weights, list(fn.outputs))
        return LoweredModule(self.bb.get(), entries)

    def _function(self, fn: Function, *, weights: list[str], primitive: bool) -> None:
        env: dict[str, relax.Var] = {}
        self.types = fn.value_types(self.module)
        params = []
        for p in fn.params:
            env[p.name] = relax.Var(p.name, self.symbols.relax_type(p.type))
            params.append(env[p.name])
        for w in weights:
            env["@" + w] = relax.Var(_weight_var_name(w), self.symbols.relax_type(self.module.weights[w].type))
            params.append(env["@" + w])
        attrs = {"Primitive": True} if primitive else {"num_input": len(fn.params)}
        with self.bb.function(fn.name, params, attrs=attrs, private=primitive):
            with self.bb.dataflow():
                for node in fn.nodes:
                    env[node.name] = self._node(node, env)
                outs = [env[o] for o in fn.outputs]
                result = self.bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
            self.bb.emit_func_output(result)
        self.gvars[fn.name] = self.bb.get().get_global_var(fn.name)

    def _node(self, node: Node, env: dict) -> relax.Var:
        args = [env[i] for i in node.inputs]
        if node.op is CALL:
            return self.bb.emit(relax.Call(self.gvars[node.callee], args), name_hint=node.name)
        in_types = [self.types[i] for i in node.inputs]
        expr = LOWERINGS[node.op](LowerContext(self.symbols, node, in_types, self.bb), args)
        return self.bb.emit(expr, name_hint=node.name)


def _weight_var_name(name: str) -> str:
    return "w_" + name.replace(".", "_")


def lower_to_relax(module: Module) -> LoweredModule:
    """Translate a verified slimgraph module to Relax (fused groups as primitive functions)."""
    return _Lowerer(module).run()


def const(value, dtype: DType) -> relax.Constant:
    return relax.const(np.asarray(value, dtype=dtype.numpy), TVM_DTYPES[dtype])

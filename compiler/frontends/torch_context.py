"""Shared state of a PyTorch import: value refs, symbolic-size mapping, dtype mapping and the
helpers every ATen converter uses (constants, casts, shapes).

Sizes are never graph values in slimgraph: a torch ``SymInt`` such as ``s0`` or ``2*s0`` becomes a
dim expression over the user's dim names (``T``, ``2*T``) when the graph is imported, so
``sym_size`` and arithmetic on sizes disappear from the IR.
"""

from __future__ import annotations

import sympy
import torch

from slimgraph.compiler import ops
from slimgraph.compiler.errors import UnsupportedOpsError
from slimgraph.compiler.ir import FunctionBuilder
from slimgraph.compiler.types import DType, TensorType, canonical_dim, dim_expr

TORCH_TO_DTYPE = {
    torch.float32: DType.f32, torch.float16: DType.f16, torch.float64: DType.f64, torch.int64: DType.i64,
    torch.int32: DType.i32, torch.int16: DType.i16, torch.int8: DType.i8, torch.uint8: DType.u8,
    torch.bool: DType.bool,
}


aten = torch.ops.aten

# ATen overload (aten.add.Tensor) or packet (aten.add) -> converter(ctx, args_by_name) -> ref(s)
CONVERTERS: dict = {}
# Ops that compute nothing the IR needs (runtime asserts on metadata).
IGNORED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
           aten._assert_async.msg, aten.sym_constrain_range.default}


def converts(*targets):
    """Register a converter for one or more ATen overloads / packets."""
    def register(fn):
        for target in targets:
            CONVERTERS[target] = fn
        return fn
    return register


class ConversionUnsupported(Exception):
    """A converter met an argument combination it does not handle (e.g. a transposed conv)."""


class SizeValue:
    """What an fx node computing a size (``sym_size``, ``s0 * 2``) imports as: a dim, not a tensor."""

    __slots__ = ("dim",)

    def __init__(self, dim):
        self.dim = dim


class ImportContext:
    """Maps fx nodes to IR value refs while one exported graph is converted."""

    def __init__(self, source: str, weights: dict, symbol_names: dict):
        self.source = source
        self.builder = FunctionBuilder("main", weights)
        self.values: dict = {}          # fx node -> ref ("name" / "@weight"), tuple of refs, or SizeValue
        self.symbol_names = symbol_names  # torch symbol name ("s0") -> user dim name ("T")
        self.node = None                # the fx node being converted (for error messages)

    # ------------------------------------------------------------------ symbolic sizes
    def dim(self, value):
        """An int, torch SymInt or fx node holding a size -> a slimgraph Dim."""
        if isinstance(value, torch.fx.Node):
            value = self.values[value]
            if isinstance(value, SizeValue):
                return value.dim
        if isinstance(value, torch.SymInt):
            return self.sym_expr(value.node.expr)
        if isinstance(value, (int, sympy.Expr)):
            return self.sym_expr(sympy.sympify(value))
        raise ConversionUnsupported(f"expected a size, got {value!r}")

    def sym_expr(self, expr: sympy.Expr):
        """Rename torch's shape symbols to the user's names and drop torch-only sympy functions."""
        expr = sympy.sympify(expr)
        if expr.is_Integer:
            return int(expr)
        expr = _plain_sympy(expr)
        mapping = {}
        for sym in expr.free_symbols:
            name = self.symbol_names.get(sym.name, sym.name)
            mapping[sym] = dim_expr(name)
        return canonical_dim(expr.xreplace(mapping))

    def shape_of(self, fake) -> tuple:
        return tuple(self.dim(d) for d in fake.shape)

    def meta_type(self, node: torch.fx.Node) -> TensorType:
        """The IR type of an fx node's (first) tensor output, from torch's fake-tensor metadata."""
        val = node.meta["val"]
        if isinstance(val, (tuple, list)):
            val = val[0]
        return TensorType(torch_dtype(val.dtype), self.shape_of(val))

    def out_type(self) -> TensorType:
        return self.meta_type(self.node)

    # ------------------------------------------------------------------ values
    def is_tensor(self, arg) -> bool:
        return isinstance(arg, torch.fx.Node) and isinstance(self.values.get(arg), str)

    def tensor(self, arg) -> str:
        """The IR ref of a tensor argument (an fx node)."""
        if not self.is_tensor(arg):
            raise ConversionUnsupported(f"argument {arg} is not a tensor")
        return self.values[arg]

    def type(self, ref: str) -> TensorType:
        return self.builder.type_of(ref)

    def add(self, op, inputs, attrs=None) -> str:
        hint = self.node.name if self.node is not None else op.name
        return self.builder.add(op, inputs, attrs or {}, name=hint)

    def cast(self, ref: str, dtype: DType) -> str:
        return ref if self.type(ref).dtype is dtype else self.add(ops.CAST, [ref], {"dtype": dtype})

    def constant(self, value, dtype: DType, shape=()) -> str:
        """A tensor filled with a number (or a symbolic size: sum of ``size`` ones)."""
        if isinstance(value, (torch.SymInt, torch.fx.Node)):
            return self.size_scalar(self.dim(value), dtype, shape)
        if isinstance(value, bool):
            value = float(value)
        return self.add(ops.CONSTANT, [], {"value": float(value), "dtype": dtype, "shape": shape})

    def size_scalar(self, dim, dtype: DType, shape=()) -> str:
        """A symbolic size as a tensor value: ``sum(ones[dim])`` (folds to a constant once static)."""
        if isinstance(dim, int):
            return self.constant(dim, dtype, shape)
        ones = self.add(ops.CONSTANT, [], {"value": 1.0, "dtype": dtype, "shape": (dim,)})
        total = self.add(ops.SUM, [ones], {"axes": (0,)})
        return total if not shape else self.add(ops.BROADCAST_TO, [total], {"shape": shape})

    def operand(self, arg, dtype: DType) -> str:
        """A tensor or Python scalar argument as a ref of ``dtype`` (scalars become constants)."""
        if self.is_tensor(arg):
            return self.cast(self.tensor(arg), dtype)
        return self.constant(arg, dtype)

    def unsupported(self, reason: str):
        raise ConversionUnsupported(reason)

    def error_for(self, node, reason: str) -> UnsupportedOpsError:
        return UnsupportedOpsError(self.source, {f"{node.target} ({reason})": (1, node.name)})


def torch_dtype(dtype: torch.dtype) -> DType:
    if dtype not in TORCH_TO_DTYPE:
        raise ConversionUnsupported(f"dtype {dtype} has no slimgraph equivalent")
    return TORCH_TO_DTYPE[dtype]


def meta_value(arg):
    """The fake value torch recorded for an argument (a FakeTensor, SymInt) or the Python scalar."""
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


def _plain_sympy(expr: sympy.Expr) -> sympy.Expr:
    """Replace torch's integer sympy functions (FloorDiv, CleanDiv, Mod, ...) by plain sympy."""
    from torch.utils._sympy import functions as F

    rewrites = {
        F.FloorDiv: lambda a, b: sympy.floor(a / b),
        F.CleanDiv: lambda a, b: a / b,
        F.Mod: lambda a, b: sympy.Mod(a, b),
        F.PythonMod: lambda a, b: sympy.Mod(a, b),
        F.CeilDiv: lambda a, b: sympy.ceiling(a / b),
        F.IntTrueDiv: lambda a, b: a / b,
    }
    for cls, fn in rewrites.items():
        if not isinstance(cls, type):
            continue
        expr = expr.replace(lambda e, cls=cls: isinstance(e, cls), lambda e, fn=fn: fn(*e.args))
    return expr

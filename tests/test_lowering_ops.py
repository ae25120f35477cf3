"""Every op lowers to TVM and matches its numpy reference (with slimgraph's CPU schedules).

Each case builds a one-node module with a symbolic dim T where the op allows it, compiles it for
the host x86 CPU and compares the TVM result with the interpreter at T=5.
"""

import numpy as np
import pytest

from slimgraph.compiler import ops
from slimgraph.compiler.interpreter import run
from slimgraph.compiler.ir import FunctionBuilder, Module
from slimgraph.compiler.types import DType, TensorType

tvm = pytest.importorskip("tvm")

F32, I64, BOOL = DType.f32, DType.i64, DType.bool
X = TensorType(F32, (2, "T", 8))
ROW = TensorType(F32, (8,))

CASES = [
    *[(op, [X], {}) for op in ops.UNARY_FLOAT_OPS if op not in (ops.LOG, ops.SQRT, ops.RSQRT, ops.GELU, ops.CLIP)],
    (ops.LOG, [X], {"positive": True}), (ops.SQRT, [X], {"positive": True}), (ops.RSQRT, [X], {"positive": True}),
    (ops.GELU, [X], {"approximate": "tanh"}), (ops.GELU, [X], {}), (ops.CLIP, [X], {"min": -0.5, "max": 0.5}),
    *[(op, [X, ROW], {}) for op in (ops.ADD, ops.SUB, ops.MUL, ops.DIV, ops.MAXIMUM, ops.MINIMUM)],
    (ops.POW, [X, TensorType(F32, ())], {"positive": True}),
    *[(op, [X, ROW], {}) for op in (ops.EQ, ops.NE, ops.LT, ops.LE, ops.GT, ops.GE)],
    (ops.FLOOR_DIV, [TensorType(I64, ("T",)), TensorType(I64, ())], {}),
    (ops.MOD, [TensorType(I64, ("T",)), TensorType(I64, ())], {}),
    (ops.LOGICAL_AND, [TensorType(BOOL, ("T",)), TensorType(BOOL, ("T",))], {}),
    (ops.LOGICAL_OR, [TensorType(BOOL, ("T",)), TensorType(BOOL, ("T",))], {}),
    (ops.LOGICAL_NOT, [TensorType(BOOL, ("T",))], {}),
    (ops.WHERE, [TensorType(BOOL, ("T", 8)), X, ROW], {}),
    (ops.CAST, [X], {"dtype": DType.i64}), (ops.CAST, [TensorType(BOOL, ("T",))], {"dtype": DType.f32}),
    *[(op, [X], {"axes": (-1,), "keepdims": True}) for op in (ops.SUM, ops.MEAN, ops.MAX, ops.MIN)],
    (ops.SUM, [X], {"axes": (0, 1)}), (ops.PROD, [X], {"axes": (2,)}),
    (ops.ANY, [TensorType(BOOL, (3, "T"))], {"axes": (1,)}), (ops.ALL, [TensorType(BOOL, (3, "T"))], {"axes": (1,)}),
    (ops.ARGMAX, [X], {"axis": -1}),
    (ops.CUMSUM, [X], {"axis": 1}), (ops.CUMSUM, [TensorType(I64, ("T", 3))], {"axis": 0}),
    (ops.SOFTMAX, [X], {"axis": -1}), (ops.SOFTMAX, [X], {"axis": -1, "log": True}),
    (ops.LAYER_NORM, [X, ROW, ROW], {"eps": 1e-5}), (ops.LAYER_NORM, [X], {}),
    (ops.RMS_NORM, [X, ROW], {"eps": 1e-6}),
    (ops.MATMUL, [X, TensorType(F32, (8, 12))], {}),
    (ops.MATMUL, [TensorType(F32, (3, "T", 8)), TensorType(F32, (3, 8, "T"))], {}),
    (ops.MATMUL, [TensorType(F32, (1, 1, 512)), TensorType(F32, (512, 128))], {}),   # one row: depth split in parts
    (ops.RESHAPE, [X], {"shape": (2, "T", 2, 4)}), (ops.TRANSPOSE, [X], {"perm": (1, 0, 2)}),
    (ops.BROADCAST_TO, [ROW], {"shape": ("T", 8)}),
    (ops.CONCAT, [X, X], {"axis": 1}),
    (ops.SLICE, [X], {"axis": 1, "start": 1, "end": "T"}), (ops.SLICE, [X], {"axis": 2, "start": 0, "end": 8, "step": 3}),
    (ops.TAKE, [TensorType(F32, (10, 8)), TensorType(I64, (1, "T"))], {"axis": 0}),
    (ops.GATHER_ELEMENTS, [X, TensorType(I64, (2, "T", 8))], {"axis": 2}),
    (ops.PAD, [X], {"pads": (0, 0, 1, 2, 0, 1), "value": 0.5}),
    (ops.CONSTANT, [], {"value": 2.5, "dtype": F32, "shape": (2, 3)}),
    (ops.CONSTANT, [], {"value": -1.0, "dtype": F32, "shape": ("T",)}),
    (ops.ARANGE, [], {"length": "T", "start": 2, "step": 3}),
    (ops.CONV2D, [TensorType(F32, (1, 4, 9, 9)), TensorType(F32, (6, 2, 3, 3)), TensorType(F32, (6,))],
     {"strides": (2, 1), "padding": (1, 0, 1, 2), "groups": 2}),
    (ops.MAX_POOL2D, [TensorType(F32, (1, 3, 8, 8))], {"kernel": (3, 3), "strides": (2, 2), "padding": (1, 1, 1, 1)}),
    (ops.AVG_POOL2D, [TensorType(F32, (1, 3, 8, 8))], {"kernel": (2, 2), "strides": (2, 2)}),
    (ops.BATCH_NORM, [TensorType(F32, (1, 3, 4, 4))] + [TensorType(F32, (3,))] * 4, {"eps": 1e-5, "positive_var": True}),
    (ops.DEQUANTIZE, [TensorType(DType.u32, (5, "T")), TensorType(DType.f16, (3, "T")), TensorType(DType.f16, (3, "T"))],
     {"bits": 4, "group_size": 16, "rows": 40}),                     # ragged last group (40 = 2 x 16 + 8)
    (ops.DEQUANTIZE, [TensorType(DType.u32, (4, "T")), TensorType(DType.f16, (2, "T"))],
     {"bits": 3, "group_size": 32, "rows": 40}),                     # symmetric, 10 codes per word
    (ops.DYNAMIC_QUANTIZE, [TensorType(F32, (1, "T", 96))], {"bits": 8, "block": 32}),  # 3 blocks a row
    (ops.KV_CACHE_WRITE, [TensorType(F32, (1, 2, 12, 8)), TensorType(F32, (1, 2, "T", 8))],
     {"end": "T + 3"}),                                               # rows [3, 3 + T) of 12
    (ops.CACHE_ATTENTION, [TensorType(F32, (1, 4, "T", 8)), TensorType(F32, (1, 2, 12, 8)),
                           TensorType(F32, (1, 2, 12, 8)), TensorType(I64, (1, "T + 4"))],
     {"scale": 0.35}),                                                # 2 query heads per cache head, L = T + 4
    (ops.CACHE_ATTENTION, [TensorType(F32, (1, 6, 1, 32)), TensorType(F32, (1, 2, 48, 32)),
                           TensorType(F32, (1, 2, 48, 32)), TensorType(I64, (1, "T + 30"))],
     {"scale": 0.18}),                                                # a decoding step: 3 rows, 35 keys
]

UNCOVERED = {ops.CALL}


def test_every_op_has_a_case():
    covered = {case[0] for case in CASES} | UNCOVERED
    assert set(ops.OPS.values()) - covered == set()


def _inputs(types, positive, rng, env, op):
    arrays = []
    for i, t in enumerate(types):
        shape = t.concrete(env)
        if t.dtype is BOOL:
            arrays.append(rng.random(shape) > 0.5)
        elif t.dtype is DType.u32:
            arrays.append(rng.integers(0, 2**32, shape, dtype=np.uint32))
        elif t.dtype is DType.f16:
            arrays.append(rng.uniform(-2.0, 2.0, shape).round().astype(np.float16) if i == 2
                          else rng.uniform(0.01, 0.1, shape).astype(np.float16))
        elif t.dtype is I64 and op is ops.CACHE_ATTENTION:   # attention mask: padding zeros, position 0 kept
            arrays.append(np.concatenate([np.ones(shape[:-1] + (1,), np.int64),
                                          rng.integers(0, 2, shape[:-1] + (shape[-1] - 1,))], axis=-1))
        elif t.dtype is I64:
            bound = 10 if op is ops.TAKE else (8 if op is ops.GATHER_ELEMENTS else 20)
            arrays.append(rng.integers(1 if i else 0, bound, shape).astype(np.int64))
        elif positive:
            arrays.append(rng.uniform(0.5, 2.0, shape).astype(np.float32))
        else:
            arrays.append(rng.standard_normal(shape).astype(np.float32))
    return arrays


def op_arity(op, names):
    if op.arity is None or isinstance(op.arity, tuple):
        return len(names)
    return op.arity


@pytest.mark.parametrize("op,types,attrs", CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_op_matches_reference(op, types, attrs):
    from slimgraph.backends.build import build_executable
    from slimgraph.backends.relax_lowering import lower_to_relax
    from slimgraph.backends.targets import resolve_target

    attrs = dict(attrs)
    positive = attrs.pop("positive", False) or attrs.pop("positive_var", False)
    b = FunctionBuilder("main", {})
    if not any("T" in t.shape for t in types):
        types = list(types) + [TensorType(F32, ("T",))]  # binds T for ops that create T-sized data or use T + n
    names = [b.param(f"in{i}", t) for i, t in enumerate(types)]
    b.output(b.add(op, names[:op_arity(op, names)], attrs))
    module = Module({"main": b.build()}, {})
    env = {"T": 5}
    arrays = _inputs(types, positive, np.random.default_rng(0), env, op)
    expected = run(module, arrays)[0]
    executable = build_executable(lower_to_relax(module), resolve_target("x86"))
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if expected.dtype.kind == "f":
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    else:
        np.testing.assert_array_equal(got, expected)


def test_bool_constant_tensor():
    from slimgraph.backends.build import build_executable
    from slimgraph.backends.relax_lowering import lower_to_relax
    from slimgraph.backends.targets import resolve_target

    for value in (True, False):
        b = FunctionBuilder("main", {})
        x = b.param("x", TensorType(BOOL, ("T",)))
        c = b.add(ops.CONSTANT, [], {"value": float(value), "dtype": BOOL, "shape": ("T",)})
        b.output(b.add(ops.LOGICAL_AND, [x, c]))
        vm = tvm.relax.VirtualMachine(build_executable(lower_to_relax(Module({"main": b.build()}, {})),
                                                       resolve_target("x86")), tvm.cpu())
        arg = np.array([True, False, True])
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(arg)).numpy(), arg & value)

"""Fused functions as the fusion pass emits them build into one TVM kernel each and match the
interpreter, at several values of the symbolic sequence length T (including T=1)."""

import numpy as np
import pytest

from slimgraph.compiler import ops
from slimgraph.compiler.interpreter import run
from slimgraph.compiler.ir import FunctionBuilder, FunctionKind, Module
from slimgraph.compiler.types import DType, TensorType

tvm = pytest.importorskip("tvm")

F32, I64, BOOL = DType.f32, DType.i64, DType.bool


def t(dtype, *shape):
    return TensorType(dtype, shape)


def rotary_outer(b, p):
    """inv_freq[1,32,1] @ positions[1,1,T] (K=1, N symbolic), as HF rotary embeddings compute it."""
    pos = b.add(ops.CAST, [b.add(ops.RESHAPE, [p[0]], {"shape": (1, 1, "T")})], {"dtype": F32})
    return b.add(ops.MATMUL, [p[1], pos])


def masked_scores(b, p):
    k_t = b.add(ops.TRANSPOSE, [p[1]], {"perm": (0, 1, 3, 2)})
    scores = b.add(ops.MATMUL, [p[0], k_t])
    scaled = b.add(ops.MUL, [scores, b.add(ops.CONSTANT, [], {"value": 0.125, "dtype": F32})])
    return b.add(ops.WHERE, [p[2], scaled, b.add(ops.CONSTANT, [], {"value": -1e30, "dtype": F32})])


def linear_bias_gelu(b, p):
    return b.add(ops.GELU, [b.add(ops.ADD, [b.add(ops.MATMUL, [p[0], p[1]]), p[2]])])


def swiglu(b, p):
    return b.add(ops.MUL, [b.add(ops.SILU, [b.add(ops.MATMUL, [p[0], p[1]])]), p[2]])


def residual_rms_norm(b, p):
    return b.add(ops.RMS_NORM, [b.add(ops.ADD, [p[0], p[1]]), p[2]], {"eps": 1e-5})


def scaled_softmax(b, p):
    return b.add(ops.SOFTMAX, [b.add(ops.MUL, [p[0], b.add(ops.CONSTANT, [], {"value": 0.5, "dtype": F32})])])


def layer_norm_tensor_constant(b, p):
    ones = b.add(ops.CONSTANT, [], {"value": 1.0, "dtype": F32, "shape": (384,)})
    return b.add(ops.LAYER_NORM, [b.add(ops.ADD, [p[0], ones]), p[1], p[2]], {"eps": 1e-12})


CASES = {
    "rotary_outer": (rotary_outer, [t(I64, "T"), t(F32, 1, 32, 1)]),
    "masked_scores": (masked_scores, [t(F32, 1, 9, "T", 64), t(F32, 1, 9, "T", 64), t(BOOL, 1, 1, "T", "T")]),
    "linear_bias_gelu": (linear_bias_gelu, [t(F32, 1, "T", 384), t(F32, 384, 1536), t(F32, 1536)]),
    "swiglu": (swiglu, [t(F32, 1, "T", 576), t(F32, 576, 1536), t(F32, 1, "T", 1536)]),
    "residual_rms_norm": (residual_rms_norm, [t(F32, 1, "T", 576), t(F32, 1, "T", 576), t(F32, 576)]),
    "scaled_softmax": (scaled_softmax, [t(F32, 1, 9, "T", "T")]),
    "layer_norm_tensor_constant": (layer_norm_tensor_constant, [t(F32, 1, "T", 384), t(F32, 384), t(F32, 384)]),
}


def fused_module(body, types):
    fb = FunctionBuilder("fused_case", {}, kind=FunctionKind.FUSED)
    fb.output(body(fb, [fb.param(f"p{i}", ty) for i, ty in enumerate(types)]))
    fused = fb.build()
    b = FunctionBuilder("main", {}, functions={"fused_case": fused})
    args = [b.param(f"x{i}", ty) for i, ty in enumerate(types)]
    b.output(b.add(ops.CALL, args, {"callee": "fused_case"}))
    return Module({"fused_case": fused, "main": b.build()}, {})


def sample(ty, T, rng):
    shape = ty.concrete({"T": T})
    if ty.dtype is BOOL:
        return np.tril(np.ones(shape[-2:], bool)).reshape(shape) if len(shape) == 4 else rng.random(shape) > 0.5
    if ty.dtype is I64:
        return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_kernel(case):
    from slimgraph.backends.build import build_executable
    from slimgraph.backends.relax_lowering import lower_to_relax
    from slimgraph.backends.targets import resolve_target

    module = fused_module(*CASES[case])
    vm = tvm.relax.VirtualMachine(build_executable(lower_to_relax(module), resolve_target("x86")), tvm.cpu())
    rng = np.random.default_rng(0)
    for T in (1, 7, 33):
        arrays = [sample(ty, T, rng) for ty in CASES[case][1]]
        expected = run(module, arrays)[0]
        got = vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())),
                                   err_msg=f"{case} at T={T}")


def int4_linear_add(b, p):
    """One-row product over packed 4-bit weights (576 rows in groups of 128: the last group is
    ragged), then a residual add: a decoding step's down projection."""
    weights = b.add(ops.DEQUANTIZE, [p[1], p[2], p[3]], {"bits": 4, "group_size": 128, "rows": 576})
    return b.add(ops.ADD, [b.add(ops.MATMUL, [p[0], weights]), p[4]])


def int4_down_add(b, p):
    """The down projection of SmolLM2 (1536 rows, 576 columns): nine full-width column tiles are too
    few for the cores, so the chunks are split into parts summed at the end."""
    weights = b.add(ops.DEQUANTIZE, [p[1], p[2], p[3]], {"bits": 4, "group_size": 128, "rows": 1536})
    return b.add(ops.ADD, [b.add(ops.MATMUL, [p[0], weights]), p[4]])


def int4_codes_add(b, p):
    """int4 weights times 8-bit activation codes (one scale per 32 inputs), then a residual add."""
    weights = b.add(ops.DEQUANTIZE, [p[1], p[2], p[3]], {"bits": 4, "group_size": 128, "rows": 576})
    codes = b.add(ops.DYNAMIC_QUANTIZE, [p[0]], {"bits": 8, "block": 32})
    return b.add(ops.ADD, [b.add(ops.MATMUL, [codes, weights]), p[4]])


def int8_codes_down(b, p):
    """Symmetric per-channel int8 weights (four codes a word, no zero points) times 8-bit codes."""
    weights = b.add(ops.DEQUANTIZE, [p[1], p[2]], {"bits": 8, "group_size": 1536, "rows": 1536})
    return b.add(ops.MATMUL, [b.add(ops.DYNAMIC_QUANTIZE, [p[0]], {"bits": 8, "block": 32}), weights])


def linear_add(b, p):
    return b.add(ops.ADD, [b.add(ops.MATMUL, [p[0], p[1]]), p[2]])


def linear_silu_gate(b, p):
    return b.add(ops.MUL, [b.add(ops.SILU, [b.add(ops.MATMUL, [p[0], p[1]])]), p[2]])


ONE_ROW_CASES = {  # name -> (body, parameter types, CPU schedule rule)
    "int4_linear_add": (int4_linear_add, [t(F32, 1, 1, 576), t(DType.u32, 72, 320), t(DType.f16, 5, 320),
                                          t(DType.f16, 5, 320), t(F32, 1, 1, 320)], "quantized_gemv"),
    "linear_silu_gate": (linear_silu_gate, [t(F32, 1, 1, 576), t(F32, 576, 1536), t(F32, 1, 1, 1536)], "gemv"),
    "int4_down_add": (int4_down_add, [t(F32, 1, 1, 1536), t(DType.u32, 192, 576), t(DType.f16, 12, 576),
                                      t(DType.f16, 12, 576), t(F32, 1, 1, 576)], "quantized_gemv"),
    "linear_down_add": (linear_add, [t(F32, 1, 1, 1536), t(F32, 1536, 576), t(F32, 1, 1, 576)], "gemv"),
    "int4_codes_add": (int4_codes_add, [t(F32, 1, 1, 576), t(DType.u32, 72, 320), t(DType.f16, 5, 320),
                                        t(DType.f16, 5, 320), t(F32, 1, 1, 320)], "quantized_gemv"),
    "int8_codes_down": (int8_codes_down, [t(F32, 1, 1, 1536), t(DType.u32, 384, 576), t(DType.f16, 1, 576)],
                        "quantized_gemv"),
}
ONE_ROW_CASES["int4_gate_up"] = (int4_linear_add, [t(F32, 1, 1, 576), t(DType.u32, 72, 3072), t(DType.f16, 5, 3072),
                                                  t(DType.f16, 5, 3072), t(F32, 1, 1, 3072)], "quantized_gemv")
SPLIT_DEPTH = {"int4_linear_add", "int4_down_add", "linear_down_add",  # too few full-width tiles for 2 cores
               "int4_codes_add", "int8_codes_down"}
INTEGER_CASES = {"int4_codes_add", "int8_codes_down"}   # 8-bit activation codes


def one_row_sample(ty, rng):
    if ty.dtype is DType.u32:
        return rng.integers(0, 2**32, ty.concrete({}), dtype=np.uint64).astype(np.uint32)
    if ty.dtype is DType.f16:
        return (rng.random(ty.concrete({})) * (0.02 if ty.shape[0] in (1, 5, 12) else 15)).astype(np.float16)
    return rng.standard_normal(ty.concrete({})).astype(np.float32)


def scheduled_kernel(module):
    """(target spec, TVM target, the module's one kernel with its default x86 schedule, the rule's name)."""
    from slimgraph.backends.relax_lowering import lower_to_relax
    from slimgraph.backends.schedules import cpu
    from slimgraph.backends.targets import resolve_target

    spec = resolve_target("x86")
    target = spec.tvm_target()
    with target, tvm.transform.PassContext(opt_level=3):
        kernels = tvm.transform.Sequential(cpu.lowering_passes(target))(lower_to_relax(module).ir_module)
        (func,) = [f for _, f in kernels.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
        scheduled, rule = cpu.schedule_prim_func(func, target)
    return spec, target, scheduled, rule


@pytest.mark.parametrize("case", sorted(ONE_ROW_CASES))
def test_one_row_products_stream_the_weights(case):
    """Decoding-step products over [K, N] weights get a one-row schedule (no row padding, no
    float copy of the weights): fp32 the column GEMV, packed int4 the factored product with its
    per-chunk partial sums in registers; both match the interpreter."""
    from slimgraph.backends.build import build_executable
    from slimgraph.backends.relax_lowering import lower_to_relax
    from tvm.target import codegen

    body, types, expected_rule = ONE_ROW_CASES[case]
    module = fused_module(body, types)
    spec, target, scheduled, rule = scheduled_kernel(module)
    script = scheduled.script()
    assert rule == expected_rule
    assert "_pad" not in script and "dequantize" not in script
    if case == "int4_linear_add":
        assert 'part_local = T.sblock_alloc_buffer((T.int64(9), T.int64(320)), scope="local")' in script
    if case in INTEGER_CASES and codegen.target_has_features("avx512vnni", target):
        # the integer kernel: int32 partial sums per 32 rows, vpdpbusd in place of the inner loops
        assert 'part_local = T.sblock_alloc_buffer((T.int64(' in script and '"int32", scope="local")' in script
        assert "call_llvm_pure_intrin" in script and "xq" not in script
    if spec.num_cores == 2:
        assert ("_rf" in script) == (case in SPLIT_DEPTH)
    assert ("llvm.prefetch" in script) == (expected_rule == "quantized_gemv"), \
        "the low-bit kernels prefetch the next task's words, the float32 ones nothing"
    vm = tvm.relax.VirtualMachine(build_executable(lower_to_relax(module), spec), tvm.cpu())
    arrays = [one_row_sample(ty, np.random.default_rng(0)) for ty in types]
    expected = run(module, arrays)[0]
    got = vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def test_activation_codes_feed_the_prompt_gemm():
    """Many rows of 8-bit activation codes times int4 weights: the per-block maxima stay a loop
    nest before the GEMM, whose packed A copy rounds the values; the result matches the
    interpreter at every T."""
    from slimgraph.backends.build import build_executable
    from slimgraph.backends.relax_lowering import lower_to_relax

    types = [t(F32, 1, "T", 576), t(DType.u32, 72, 320), t(DType.f16, 5, 320), t(DType.f16, 5, 320),
             t(F32, 1, "T", 320)]
    module = fused_module(int4_codes_add, types)
    spec, _, _, rule = scheduled_kernel(module)
    assert rule == "gemm"
    vm = tvm.relax.VirtualMachine(build_executable(lower_to_relax(module), spec), tvm.cpu())
    rng = np.random.default_rng(0)
    for T in (1, 7, 33):
        arrays = [one_row_sample(ty, rng) if ty.dtype is not F32 else sample(ty, T, rng) for ty in types]
        expected = run(module, arrays)[0]
        got = vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()),
                                   err_msg=f"T={T}")


def _static_shape(buffer) -> list:
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in buffer.shape]


def panel_linear_add(columns: int):
    """x @ W + residual, W [576, columns] stored as column panels [columns / 64, 576, 64] and read
    back as ``reshape(transpose(Wp, [1, 0, 2]))``, as ``pack_weights`` leaves x86 weight products."""
    def body(b, p):
        turned = b.add(ops.TRANSPOSE, [p[1]], {"perm": (1, 0, 2)})
        weight = b.add(ops.RESHAPE, [turned], {"shape": (576, columns)})
        return b.add(ops.ADD, [b.add(ops.MATMUL, [p[0], weight]), p[2]])
    return body


@pytest.mark.parametrize("rows,panels", [("T", 9), (128, 9), (128, 48)])
def test_gemm_reads_weights_stored_as_panels_in_place(rows, panels):
    """Many rows times a weight stored as column panels: the micro kernel reads each task's columns
    straight from the stored panels (its B operand is the [N / 64, K, 64] parameter, no packed
    [K, N] copy), whether the tiles are the panels (48 panels) or narrower than them (9 panels on 2
    cores: half-width tiles with a symbolic row count, row parts with 128 rows); the result
    matches the interpreter."""
    from slimgraph.backends.build import build_executable
    from slimgraph.backends.relax_lowering import lower_to_relax
    from slimgraph.backends.schedules._prefetch import statements

    columns = panels * 64
    types = [t(F32, 1, rows, 576), t(F32, panels, 576, 64), t(F32, 1, rows, columns)]
    module = fused_module(panel_linear_add(columns), types)
    spec, _, scheduled, rule = scheduled_kernel(module)
    assert rule == "gemm"
    blocks = [s for s in statements(scheduled.body) if isinstance(s, tvm.s_tir.SBlock)]
    readers = [b for b in blocks if any(_static_shape(r.source) == [panels, 576, 64] for r in b.reads)]
    assert [b.writes[0].source.scope() for b in readers] == ["local"], "only the micro kernel reads the panels"
    vm = tvm.relax.VirtualMachine(build_executable(lower_to_relax(module), spec), tvm.cpu())
    rng = np.random.default_rng(0)
    for T in ((1, 7, 33) if rows == "T" else (rows,)):
        arrays = [sample(ty, T, rng) for ty in types]
        expected = run(module, arrays)[0]
        got = vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()),
                                   err_msg=f"T={T}")


def _loop_values(loops, rng) -> dict:
    """A random value within its extent for each loop."""
    return {loop.loop_var: int(loop.min) + int(rng.integers(int(loop.extent))) for loop in loops}


def _evaluate(exprs, values: dict) -> tuple:
    """The integer values of ``exprs`` with every variable of ``values`` bound."""
    from slimgraph.backends.schedules._prefetch import substitute

    return tuple(int(v) for v in substitute(exprs, values))


@pytest.mark.parametrize("case", ["int4_linear_add", "int4_down_add", "int4_gate_up", "int4_codes_add",
                                  "int8_codes_down"])
def test_the_prefetch_touches_words_the_next_task_reads(case):
    """Every line the one-row low-bit kernel prefetches at row r of task t holds words that task t + 1
    reads at row r (found by running task t + 1's loops inside the row over all their values), with
    the tasks split over columns only (gate/up) or over columns and chunks (the others), in the float
    kernel and in the integer one (a tensor intrinsic's block reads the words where VNNI is there)."""
    from tvm import s_tir

    from slimgraph.backends.schedules._prefetch import LINE_BYTES, statements, substitute

    body, types, _ = ONE_ROW_CASES[case]
    _, _, scheduled, _ = scheduled_kernel(fused_module(body, types))
    loops = [s for s in statements(scheduled.body) if isinstance(s, tvm.tirx.For)]
    task = next(loop for loop in loops if loop.kind == tvm.tirx.ForKind.PARALLEL and "llvm.prefetch" in loop.script())
    row = next(loop for loop in loops if isinstance(loop.body, tvm.tirx.SeqStmt) and "llvm.prefetch" in
               loop.body.seq[0].script() and isinstance(loop.body.seq[0], tvm.tirx.For))
    line_loop = row.body.seq[0]
    address = line_loop.body.value.args[1].args[0]          # call_llvm_intrin(id, address_of(W[...]), ...)
    words = address.source
    realize = next(s for s in statements(row.body) if isinstance(s, s_tir.SBlockRealize)
                   and any(r.source.same_as(words) for r in s.block.reads))
    region = next(r for r in realize.block.reads if r.source.same_as(words))
    inner = [s for s in statements(row.body.seq[1]) if isinstance(s, tvm.tirx.For)]
    outer = [loop for loop in loops if loop not in inner and not loop.same_as(line_loop)]
    bindings = {iv.var: value for iv, value in zip(realize.block.iter_vars, realize.iter_values)}
    read = substitute([r.min for r in region.region], bindings)
    rng = np.random.default_rng(0)
    per_line = LINE_BYTES // 4
    for t in range(int(task.extent) - 1):
        values = {**_loop_values(outer, rng), task.loop_var: t}
        later = {**values, task.loop_var: t + 1}
        read_by_next = {_evaluate(read, {**later, **dict(zip([lp.loop_var for lp in inner], combo))})
                        for combo in np.ndindex(*[int(lp.extent) for lp in inner])}
        for line in range(int(line_loop.extent)):
            touched = _evaluate(address.indices, {**values, line_loop.loop_var: line})
            line_words = {touched[:-1] + (touched[-1] + i,) for i in range(per_line)}
            assert line_words & read_by_next, f"task {t}: line {line} at {touched} is not read by task {t + 1}"

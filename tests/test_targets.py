"""Targets: bad target flags fail fast with clear errors; CUDA artifacts built on this CPU machine hold
nvcc machine code (fatbin) and are refused where no GPU is present."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import slimgraph
from slimgraph.backends.targets import TargetSpec, resolve_target
from slimgraph.backends.targets_cuda import check_machine_code, detect_gpu_arch
from slimgraph.compiler.driver import CompileOptions, compile_model
from slimgraph.compiler.errors import TargetError
from slimgraph.compiler.recipe import recipe_from_flags

HAVE_NVCC = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="no nvcc on this machine")


def compile_cli(tmp_path, *flags, env=None):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "slimgraph.compiler.cli", "compile", "mlp", "-o", str(out),
                           "--json", *flags], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists(), "output left behind"
    error = json.loads(proc.stdout)["error"]
    return proc.returncode, f"{error['message']} {error.get('hint', '')}"


@pytest.mark.parametrize("flags,expected", [
    (("--target", "riscv"), ["unknown target 'riscv'", "arm64, cuda, x86"]),
    (("--target", "x86", "--mcpu", "pentium9"), ["unknown x86 CPU 'pentium9'"]),
    (("--target", "arm64", "--mcpu", "cortex-z1"), ["unknown ARM CPU 'cortex-z1'", "cortex-a76"]),
    (("--target", "cuda", "--arch", "sm_9x"), ["unknown CUDA architecture 'sm_9x'", "sm_90"]),
    (("--target", "x86", "--arch", "sm_90"), ["--arch sm_90 is for GPU targets"]),
    (("--target", "arm64", "--fp16"), ["--fp16 is for GPU targets"]),
    (("--target", "cuda", "--arch", "sm_90", "--mcpu", "znver4"), ["--mcpu znver4 is for CPU targets"]),
])
def test_bad_target_flags(tmp_path, flags, expected):
    code, message = compile_cli(tmp_path, *flags)
    assert code == TargetError.exit_code
    for text in expected:
        assert text in message, message


def test_arm64_without_cross_linker_names_the_package(tmp_path):
    code, message = compile_cli(tmp_path, "--target", "arm64", env={"SLIMGRAPH_ARM64_CC": "no-such-gcc"})
    assert code == TargetError.exit_code
    assert "no-such-gcc" in message and "gcc-aarch64-linux-gnu" in message


def test_arm64_without_the_aarch64_c_runtime_names_the_package(tmp_path):
    fake = tmp_path / "aarch64-gcc"   # a cross gcc whose libc is missing: -print-file-name echoes the name
    fake.write_text('#!/bin/sh\necho "${1#-print-file-name=}"\n')
    fake.chmod(0o755)
    code, message = compile_cli(tmp_path, "--target", "arm64", env={"SLIMGRAPH_ARM64_CC": str(fake)})
    assert code == TargetError.exit_code
    assert "crti.o" in message and "libc6-dev-arm64-cross" in message


def test_cuda_without_nvcc(tmp_path):
    code, message = compile_cli(tmp_path, "--target", "cuda", "--arch", "sm_90",
                                env={"SLIMGRAPH_NVCC": "/nonexistent/nvcc"})
    assert code == TargetError.exit_code
    assert "needs nvcc" in message and "/nonexistent/nvcc" in message


@pytest.mark.skipif(detect_gpu_arch() is not None, reason="a GPU is present: its architecture is the default")
def test_cuda_without_arch_and_without_gpu(tmp_path):
    code, message = compile_cli(tmp_path, "--target", "cuda")
    assert code == TargetError.exit_code and "--arch" in message


def test_spec_round_trips_through_the_manifest_form():
    spec = TargetSpec("arm64", "llvm", "aarch64", "cortex-a76", 4, "aarch64-linux-gnu", ("+dotprod", "+neon"))
    assert TargetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    old = {"name": "x86", "kind": "llvm", "arch": "x86_64", "mcpu": "znver4", "num_cores": 2}   # stage-1 manifests
    assert TargetSpec.from_dict(old).mattr == () and TargetSpec.from_dict(old).gpu_arch == ""


def test_check_machine_code_rejects_embedded_source(tmp_path):
    fake = tmp_path / "model.so"
    fake.write_bytes(b'\x7fELF...extern "C" __global__ void k() {}')
    with pytest.raises(TargetError, match="embedded as source"):
        check_machine_code(str(fake))


@needs_nvcc
@pytest.mark.parametrize("model,recipe", [("tiny-llama", None), ("tiny-llama", "int4"), ("tiny-bert", None)])
def test_cuda_build_holds_a_fatbin_and_is_refused_without_gpu(tmp_path, model, recipe):
    flags = recipe_from_flags(quantize=recipe, group_size=16) if recipe else None
    out = compile_model(model, tmp_path / "cuda", CompileOptions(target="cuda", arch="sm_90", recipe=flags))
    check_machine_code(str(out / "model.so"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["gpu_arch"] == "sm_90" and manifest["target"]["kind"] == "cuda"
    if recipe:
        assert "dequantize" in (out / "graph.ir").read_text()
    if detect_gpu_arch() is None:
        with pytest.raises(TargetError, match="no CUDA driver|no GPU"):
            slimgraph.load(out)


@pytest.mark.gpu
@pytest.mark.skipif(detect_gpu_arch() is None, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt", "tiny-bert"])
def test_cuda_artifact_matches_the_interpreter_on_the_gpu(tmp_path, model):
    from slimgraph.compiler import interpreter
    from slimgraph.compiler.driver import load_model
    from slimgraph.compiler.passmanager import compare_outputs, make_sample_inputs

    out = compile_model(model, tmp_path / "cuda", CompileOptions(target="cuda"))
    module = load_model(model)[0]
    for length in (1, 7):
        inputs = make_sample_inputs(module, seed=length, symbol_value=length)
        got = slimgraph.load(out)(**inputs)[0]
        want = interpreter.run(module, inputs)[0]
        assert compare_outputs(want, got).cosine >= 0.9999
        assert np.abs(got - want).max() <= 1e-3 * max(np.abs(want).max(), 1e-6)


def test_resolve_target_records_arm_features():
    spec = resolve_target("arm64", "neoverse-n1")
    assert {"+neon", "+dotprod"} <= set(spec.mattr) and spec.mtriple == "aarch64-linux-gnu"
    assert "+dotprod" not in resolve_target("arm64", "cortex-a72").mattr


@needs_nvcc
@pytest.mark.parametrize("model,fp16", [("tiny-llama", True), ("tiny-gpt", False)])
def test_cuda_kernels_reading_masks_have_no_vector_bool_access(model, fp16):
    """TVM's CUDA codegen loads two bools as one ``ushort2`` (wrong bytes, misaligned): kernels
    that touch bool memory must come out of the GPU schedules with serial loops only."""
    from tvm import tirx

    from slimgraph.backends.schedules import gpu

    options = CompileOptions(target="cuda", arch="sm_90", fp16=fp16, shapes={"input_ids": (1, 64)})
    lowered, target = _lowered_for_cuda(model, options)
    with target:
        masked = [g for g, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc) and gpu.touches_bool_memory(f)]
        dlight_only = [gpu.schedule_prim_func(lowered[g], target, gpu.default_rules())[0] for g in masked]
        scheduled = gpu.schedule_pass(target, gpu.default_rules())(lowered)
    assert masked, "the model should pass a bool mask between kernels"
    assert any("T.vectorized" in f.script() for f in dlight_only), "DLight alone vectorizes masked kernels"
    assert not any("T.vectorized" in scheduled[g].script() for g in masked)


@needs_nvcc
def test_every_scheduled_cuda_kernel_runs_on_gpu_threads():
    """DLight's Transpose rule schedules only the transpose of a fused function and leaves the
    blocks after it (a GQA key/value broadcast) outside any thread loop, so they would run on the
    host and dereference device pointers; such a schedule is refused and the next rule applies."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    from slimgraph.backends.schedules import gpu

    options = CompileOptions(target="cuda", arch="sm_90", fp16=True, shapes={"input_ids": (1, 1)})
    lowered, target = _lowered_for_cuda("tiny-llama", options)
    kernels = {g.name_hint: f for g, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)}
    with target:
        transposed = {name: dl.gpu.Transpose().apply(f, target, False) for name, f in kernels.items()}
        rules = {name: gpu.schedule_prim_func(f, target, gpu.default_rules()) for name, f in kernels.items()}
    broken = [name for name, sch in transposed.items() if sch is not None and gpu.unbound_blocks(sch)]
    assert broken, "DLight's Transpose alone leaves blocks of a fused broadcast unbound"
    for name in broken:
        func, rule = rules[name]
        assert rule not in (None, "Transpose"), (name, rule)
        assert not gpu.unbound_blocks(s_tir.Schedule(func)), name
    assert all(rule is not None for _, rule in rules.values())


def _lowered_for_cuda(model: str, options: CompileOptions):
    """(kernels of ``model`` as the CUDA pipeline sees them before scheduling, the target)."""
    import tvm

    from slimgraph.backends.relax_lowering import lower_to_relax
    from slimgraph.backends.schedules import gpu
    from slimgraph.compiler.driver import load_model, optimize

    module, path = load_model(model)
    module = optimize(module, options, model_path=path).module
    target = resolve_target("cuda", None, gpu_arch="sm_90", fp16=options.fp16).tvm_target()
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(gpu.lowering_passes(target))(lower_to_relax(module).ir_module), target


@needs_nvcc
@pytest.mark.parametrize("quantize", [None])
def test_one_token_products_get_the_column_gemv_schedule(tmp_path, quantize):
    """Decoding-step products over [K, N] float16 weights are read row by row, with the rows split
    across thread groups (threadIdx.y) and a cross-thread sum; the build holds a fatbin. (Packed int4
    words: ``test_int4_words_are_stored_transposed_where_the_products_are_wide``.)"""
    from tvm import tirx

    from slimgraph.backends.schedules import gpu

    recipe = recipe_from_flags(quantize=quantize, group_size=32) if quantize else None
    options = CompileOptions(target="cuda", arch="sm_90", fp16=True, shapes={"input_ids": (1, 1)}, recipe=recipe)
    lowered, target = _lowered_for_cuda("tiny-llama", options)
    with target:
        rules = {g.name_hint: gpu.schedule_prim_func(f, target, gpu.default_rules())
                 for g, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc) and "matmul" in g.name_hint}
    column = {name: func for name, (func, rule) in rules.items() if rule == "ColumnGEMV"}
    assert len(column) >= 6, {name: rule for name, (_, rule) in rules.items()}
    assert all('thread="threadIdx.y"' in func.script() for func in column.values())
    out = compile_model("tiny-llama", tmp_path / "cuda", options)
    check_machine_code(str(out / "model.so"))


@pytest.mark.gpu
@pytest.mark.skipif(detect_gpu_arch() is None, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_one_token_cuda_build_matches_its_ir_on_the_gpu(tmp_path, quantize):
    from golden_util import artifact_cosine_against_its_ir

    recipe = recipe_from_flags(quantize=quantize, group_size=32) if quantize else None
    out = compile_model("tiny-llama", tmp_path / "cuda", CompileOptions(target="cuda", fp16=True, recipe=recipe,
                                                                          shapes={"input_ids": (1, 1)}))
    assert artifact_cosine_against_its_ir(out) >= 0.999


@pytest.mark.parametrize("outputs,rows,vector_lanes,plan", [
    (5632, 2048, True, (2, 32, 4)),     # int4 gate/up of a 1.1B LLaMA: 8-byte loads, 32 lanes over K
    (32000, 2048, True, (4, 32, 4)),    # its LM head: enough threads for 16-byte loads
    (1536, 576, True, (2, 8, 8)),       # SmolLM2's MLP: 72 packed rows, 8 lanes of 9 rows
    (49152, 576, True, (2, 8, 8)),
    (2048, 2048, False, None),          # few outputs, many rows: the column threads split K 64 ways
    (2048, 5632, False, None),
    (576, 1536, False, None),
])
def test_one_token_int4_products_choose_their_schedule_by_shape(outputs, rows, vector_lanes, plan):
    from slimgraph.backends.schedules.gpu_gemv import GemvShape, plan_vector_lanes, uses_vector_lanes

    shape = GemvShape(outputs, rows, rows_per_word=8, weight_bytes=4)
    assert uses_vector_lanes(shape) is vector_lanes
    assert not uses_vector_lanes(GemvShape(outputs, rows, rows_per_word=1, weight_bytes=2)), "float weights"
    if plan is not None:
        got = plan_vector_lanes(shape)
        assert (got.vector, got.lanes, got.groups) == plan
        assert (rows // 8) % got.lanes == 0 and outputs % (got.vector * got.groups) == 0


@needs_nvcc
def test_one_token_int4_kernel_with_vector_lanes_reads_vectors_and_stages_the_activations():
    """A wide int4 product's decoding kernel: each thread loads two packed words of a row at once
    (8 bytes), the activation row is staged in shared memory with 16-byte loads, and the lanes'
    sums meet in shared memory after one barrier."""
    import tvm

    from slimgraph.backends.schedules import gpu
    from slimgraph.models.kernels import int4_product

    target = resolve_target("cuda", None, gpu_arch="sm_90", fp16=True).tvm_target()
    (func,) = gpu.lowered_kernels(int4_product(512, 1024), target)
    with target:
        scheduled, rule = gpu.schedule_prim_func(func, target, gpu.default_rules())
        built = tvm.tirx.build(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "gemv")}), target=target)
    source = (built.imports[0] if built.imports else built).inspect_source()
    assert rule == "ColumnGEMV"
    assert "*(uint2*)(p" in source and "*(uint4*)(p" in source and "__shared__" in source
    assert source.count("__syncthreads()") >= 2



@needs_nvcc
def test_int4_words_are_stored_transposed_where_the_products_are_wide():
    """CUDA stores a quantized product's words (and their scales and zero points) transposed ([N, K / 8],
    K contiguous per output) where a
    warp's lanes split a row into whole steps (K % 256 == 0: every product of a 1.1B LLaMA), for wide
    products (N >= 2K) and for short rows (K <= 1024); other products keep [K / 8, N] words and the
    column schedule. The tiny model's rows (K = 64) are short: DLight's GEMV reads them."""
    from tvm import tirx

    from slimgraph.backends.schedules import gpu
    from slimgraph.backends.targets_cuda import reads_words_transposed
    from slimgraph.compiler.driver import load_model, optimize
    from slimgraph.passes.pack_weights import SUFFIX

    assert reads_words_transposed(2048, 11264) and reads_words_transposed(2048, 32000)
    assert reads_words_transposed(576, 576) and reads_words_transposed(576, 960)
    assert all(reads_words_transposed(k, n) for k, n in [(2048, 2560), (2048, 2048), (5632, 2048), (1536, 576)])
    assert not any(reads_words_transposed(k, n) for k, n in [(1152, 1152), (1600, 3000)])
    options = CompileOptions(target="cuda", arch="sm_90", fp16=True, shapes={"input_ids": (1, 1)},
                             recipe=recipe_from_flags(quantize="int4", group_size=32))
    module, path = load_model("tiny-llama")
    weights = optimize(module, options, model_path=path).module.weights
    words = {n: w.type.shape for n, w in weights.items() if n.endswith((".qweight", f".qweight{SUFFIX}"))}
    assert words and all(shape[2] == 1 for n, shape in words.items() if n.endswith(SUFFIX))
    assert {n for n in words if not n.endswith(SUFFIX)} == set(), "the tiny model's rows are all short"
    groups = {n: w.type.shape for n, w in weights.items()   # of the products; the token embedding's are gathered
              if n.endswith((".scales", ".zeros", f".scales{SUFFIX}")) and not n.startswith("model.embed_tokens")}
    assert groups and all(n.endswith(SUFFIX) and shape[2] == 1 for n, shape in groups.items()), "scales follow"
    lowered, target = _lowered_for_cuda("tiny-llama", options)
    with target:
        rules = {g.name_hint: gpu.schedule_prim_func(f, target, gpu.default_rules())[1]
                 for g, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc) and "matmul" in g.name_hint}
    transposed = [rule for name, rule in rules.items() if "transpose_reshape_dequantize" in name]
    assert transposed and set(transposed) == {"GEMV"}, rules


def _dequantize_prim_func(rows: int, outputs: int, zeros: bool, dtype):
    """The dequantize PrimFunc that ``lower_to_relax`` makes for packed int4 words [rows / 8, outputs]."""
    from tvm import tirx

    from slimgraph.backends.relax_lowering import lower_to_relax
    from slimgraph.compiler import ops
    from slimgraph.compiler.ir import FunctionBuilder, Module
    from slimgraph.compiler.types import DType, TensorType

    groups = rows // 16
    b = FunctionBuilder("main", {})
    inputs = [b.param("w", TensorType(DType.u32, (rows // 8, outputs))),
              b.param("s", TensorType(DType.f16, (groups, outputs)))]
    if zeros:
        inputs.append(b.param("z", TensorType(DType.f16, (groups, outputs))))
    b.output(b.add(ops.DEQUANTIZE, inputs, {"bits": 4, "group_size": 16, "rows": rows, "dtype": dtype}))
    lowered = lower_to_relax(Module({"main": b.build()}, {})).ir_module
    (func,) = [f for _, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)]
    return func


@pytest.mark.parametrize("zeros,dtype", [(True, "f16"), (False, "f32"), (True, "f32")])
def test_cuda_dequantize_makes_floats_of_codes_through_their_bits_with_the_same_values(zeros, dtype):
    """The CUDA pipeline's dequantize has no integer-to-float conversion of a code (an or into the
    bits of 2^23, then a subtraction of 2^23) and gives the very values of the plain one: both built
    for the CPU and run on words holding every code, compared bit for bit."""
    import tvm

    from slimgraph.backends.schedules.gpu_dequantize import codes_through_bits
    from slimgraph.compiler.types import DType

    plain = _dequantize_prim_func(64, 24, zeros, DType.f16 if dtype == "f16" else DType.f32)
    rebuilt = codes_through_bits(plain)
    assert 'T.Cast("float32", w[' in plain.script() and "T.reinterpret" not in plain.script()
    assert 'T.Cast("float32", w[' not in rebuilt.script() and 'T.reinterpret("float32"' in rebuilt.script()
    assert dict(rebuilt.attrs) == dict(plain.attrs)
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2 ** 32, size=(8, 24), dtype=np.uint32)
    words[0, :16] = np.arange(16, dtype=np.uint32) * 0x11111111  # every code in every position
    params = [words, (rng.random((4, 24)) * 0.1 + 0.01).astype(np.float16)]
    if zeros:
        params.append(rng.integers(0, 16, size=(4, 24)).astype(np.float16) + np.float16(0.25))
    outs = []
    for func in (plain, rebuilt):
        built = tvm.tirx.build(func.with_attr("global_symbol", "dequantize"), target="llvm")
        out = tvm.runtime.tensor(np.zeros((64, 24), "float16" if dtype == "f16" else "float32"))
        built(*[tvm.runtime.tensor(p) for p in params], out)
        outs.append(out.numpy())
    assert np.array_equal(outs[0].view(np.uint8), outs[1].view(np.uint8))
    assert len(np.unique(outs[1])) > 100


def test_cuda_pipeline_dequantizes_the_one_token_products_through_the_bits():
    """Every fused product of an int4 one-token CUDA build reads its codes through the bits; the CPU
    pipeline keeps its own (factored) kernels."""
    from tvm import tirx

    options = CompileOptions(target="cuda", arch="sm_90", fp16=True, shapes={"input_ids": (1, 1)},
                             recipe=recipe_from_flags(quantize="int4", group_size=32))
    lowered, _ = _lowered_for_cuda("tiny-llama", options)
    products = {g.name_hint: f.script() for g, f in lowered.functions_items()
                if isinstance(f, tirx.PrimFunc) and "dequantize" in g.name_hint}
    assert len(products) >= 4, sorted(products)
    assert all('T.reinterpret("float32"' in text and 'T.Cast("float32", p' not in text.split("T.reinterpret")[0]
               for text in products.values()), sorted(products)


def _cuda_product_kernel(rows_of_x: int, k: int = 256, n: int = 64):
    """The unscheduled fused kernel of ``matmul(x[rows_of_x, k] f16, dequantize(int4 words) -> f16, out f32)``
    after the CUDA pipeline's lowering passes, and the product's inputs."""
    import tvm
    from tvm import tirx

    from slimgraph.backends.relax_lowering import lower_to_relax
    from slimgraph.backends.schedules import gpu
    from slimgraph.compiler import ops
    from slimgraph.compiler.ir import FunctionBuilder, Module
    from slimgraph.compiler.types import DType, TensorType
    from slimgraph.passes.fusion import fuse

    b = FunctionBuilder("main", {})
    x = b.param("x", TensorType(DType.f16, (1, rows_of_x, k)))
    inputs = [b.param("w", TensorType(DType.u32, (k // 8, n))), b.param("s", TensorType(DType.f16, (k // 32, n))),
              b.param("z", TensorType(DType.f16, (k // 32, n)))]
    weight = b.add(ops.DEQUANTIZE, inputs, {"bits": 4, "group_size": 32, "rows": k, "dtype": DType.f16})
    b.output(b.add(ops.MATMUL, [x, weight], {"out_dtype": DType.f32}))
    target = resolve_target("cuda", None, gpu_arch="sm_90", fp16=True).tvm_target()
    with target, tvm.transform.PassContext(opt_level=3):
        lowered = tvm.transform.Sequential(gpu.lowering_passes(target))(
            lower_to_relax(fuse(Module({"main": b.build()}, {})).module).ir_module)
    (func,) = [f for _, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)]
    rng = np.random.default_rng(3)
    data = [rng.standard_normal((1, rows_of_x, k)).astype(np.float16),
            rng.integers(0, 2 ** 32, size=(k // 8, n), dtype=np.uint32),
            (rng.random((k // 32, n)) * 0.1 + 0.01).astype(np.float16),
            (rng.random((k // 32, n)) * 15).astype(np.float16)]
    return func, data


@pytest.mark.parametrize("rows_of_x", [1, 4])
def test_cuda_one_token_products_read_float32_weights(rows_of_x):
    """A one-token product of a float16 CUDA build multiplies by the float32 weights ``(q - z) * s``
    (not rounded to float16 and back); products of several rows keep float16 weights (their GEMM
    kernels stage the weights in shared memory). Run on the CPU against both references."""
    import tvm

    from slimgraph.passes.quant_format import dequantize_packed

    func, (x, words, scales, zeros) = _cuda_product_kernel(rows_of_x)
    built = tvm.tirx.build(func.with_attr("global_symbol", "product"), target="llvm")
    out = tvm.runtime.tensor(np.zeros((1, rows_of_x, 64), np.float32))
    built(*[tvm.runtime.tensor(a) for a in (words, scales, zeros, x)], out)
    weight32 = dequantize_packed(words, scales, zeros, bits=4, group_size=32, rows=256)
    exact = x.astype(np.float32)[0] @ weight32
    rounded = x.astype(np.float32)[0] @ weight32.astype(np.float16).astype(np.float32)
    error = {name: float(np.abs(out.numpy()[0] - ref).max() / np.abs(ref).max())
             for name, ref in (("float32", exact), ("float16", rounded))}
    expected = "float32" if rows_of_x == 1 else "float16"
    other = "float16" if rows_of_x == 1 else "float32"
    assert error[expected] < 1e-6 and error[other] > 1e-5, error


def test_one_token_softmax_over_one_key_is_one_cuda_kernel():
    """A one-token step attends over a single key: its fused softmax -> cast -> mul (its unit
    reductions look spatial to DLight) is one kernel, a thread block per head, instead of three."""
    import tvm
    from tvm import tirx

    from slimgraph.backends.relax_lowering import lower_to_relax
    from slimgraph.backends.schedules import gpu
    from slimgraph.compiler import ops
    from slimgraph.compiler.ir import FunctionBuilder, Module
    from slimgraph.compiler.types import DType, TensorType
    from slimgraph.passes.fusion import fuse

    b = FunctionBuilder("main", {})
    scores = b.param("scores", TensorType(DType.f32, (1, 32, 1, 1)))
    values = b.param("values", TensorType(DType.f16, (1, 32, 1, 64)))
    weights = b.add(ops.CAST, [b.add(ops.SOFTMAX, [scores], {"axis": -1})], {"dtype": DType.f16})
    b.output(b.add(ops.MUL, [weights, values]))
    target = resolve_target("cuda", None, gpu_arch="sm_90", fp16=True).tvm_target()
    with target, tvm.transform.PassContext(opt_level=3):
        lowered = tvm.transform.Sequential(gpu.lowering_passes(target))(
            lower_to_relax(fuse(Module({"main": b.build()}, {})).module).ir_module)
        (func,) = [f for _, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)]
        scheduled, rule = gpu.schedule_prim_func(func, target, gpu.default_rules())
        fallback, _ = gpu.schedule_prim_func(func, target, [gpu.dl.gpu.Fallback()])
    assert rule == "RowChain"
    assert scheduled.script().count('thread="blockIdx.x"') == 1
    assert 'T.thread_binding(T.int64(32), thread="blockIdx.x")' in scheduled.script()
    assert fallback.script().count('thread="blockIdx.x"') == 3, "the kernels it replaces"

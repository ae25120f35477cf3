"""RowGEMV: CUDA one-token products over quantized words stored K-contiguous per output."""

from __future__ import annotations

import pytest

from slimgraph.backends.schedules.gpu_factored_gemv import ROW_STAGE
from slimgraph.backends.schedules.gpu_row_gemv import RowGEMV, RowPlan, RowShape, plan_rows
from slimgraph.backends.targets import resolve_target
from slimgraph.backends.targets_cuda import detect_gpu_arch, find_nvcc
from slimgraph.compiler.errors import TargetError


def _have_nvcc() -> bool:
    try:
        find_nvcc()
    except TargetError:
        return False
    return True


needs_nvcc = pytest.mark.skipif(not _have_nvcc(), reason="no nvcc on this machine")


@pytest.mark.parametrize("outputs,words,plan", [
    (2560, 256, RowPlan(2, 4)),      # a 1.1B LLaMA's q/k/v: 8-byte loads, four steps of the lanes
    (2048, 704, RowPlan(2, 4)),      # its down projection (K = 5632): eleven steps
    (32000, 256, RowPlan(2, 4)),     # its LM head
    (576, 192, RowPlan(2, 4)),       # SmolLM2's down projection (K = 1536)
    (102, 96, RowPlan(1, 2)),        # 96 words: 4-byte loads; 102 outputs make blocks of two warps
])
def test_row_plan_takes_the_widest_load_that_makes_whole_lane_steps(outputs, words, plan):
    got = plan_rows(RowShape(outputs, words, per_word=8))
    assert got == plan
    assert words % (32 * got.vector) == 0 and outputs % got.warps == 0


def test_rows_that_no_lane_step_divides_have_no_plan():
    assert plan_rows(RowShape(576, 72, per_word=8)) is None   # K = 576: 72 words, not a multiple of 32


def _product(rows: int, outputs: int, transposed: bool, residual: bool = False):
    """The fused one-token int4 product (+ a residual) as the CUDA build lowers it, and the target."""
    from slimgraph.backends.schedules import gpu
    from slimgraph.models.kernels import int4_product

    target = resolve_target("cuda", None, gpu_arch="sm_90", fp16=True).tvm_target()
    (func,) = gpu.lowered_kernels(int4_product(rows, outputs, transposed=transposed, residual=residual), target)
    return func, target


@needs_nvcc
@pytest.mark.parametrize("rows,outputs", [(2048, 512), (1536, 256)])
def test_row_gemv_loads_vectors_of_words_and_sums_lanes_with_shuffles(rows, outputs):
    """Each lane loads two words of its row at once (8 bytes) per step, the
    activation row is staged in shared memory, the 32 lanes' sums meet through warp shuffles, and the
    residual add of the epilogue is computed in the same kernel."""
    from gpu_twin import scheduled_cuda

    from slimgraph.backends.schedules import gpu

    func, target = _product(rows, outputs, transposed=True, residual=True)
    scheduled, rule, source = scheduled_cuda(func, target)
    assert rule == "RowGEMV"
    assert "*(uint2*)(p0_local" in source and "__shared__" in source
    assert "__shfl_down_sync" in source
    assert 'thread="threadIdx.y"' in scheduled.script() and not gpu.unbound_blocks(_schedule(scheduled))


def _schedule(func):
    from tvm import s_tir

    return s_tir.Schedule(func)


@needs_nvcc
def test_row_gemv_leaves_words_stored_by_rows_and_short_rows_to_other_rules():
    from slimgraph.backends.schedules import gpu

    by_rows, target = _product(2048, 512, transposed=False)
    short, _ = _product(640, 512, transposed=True)   # 80 words a row: no whole step of 32 lanes
    with target:
        assert RowGEMV().apply(by_rows, target, False) is None
        assert RowGEMV().apply(short, target, False) is None
        assert gpu.schedule_prim_func(by_rows, target, gpu.default_rules())[1] == "ColumnGEMV"
        assert gpu.schedule_prim_func(short, target, gpu.default_rules())[1] == "GEMV"


@needs_nvcc
@pytest.mark.parametrize("norm", [False, True])
def test_one_token_int4_mlp_build_reads_every_product_with_row_gemv(norm):
    """The CUDA build of a one-token int4 MLP (rows 512 and 768) stores words, scales and zero points
    transposed and schedules both products with RowGEMV, the residual add fused into the second;
    lowered with ``factored_rows`` both become factored kernels (8-byte chunks for 512 rows, 4-byte
    for 768) and an RMS norm before the first product is computed in the first product's kernel."""
    from slimgraph.backends.schedules import gpu
    from slimgraph.compiler.driver import CompileOptions, optimize
    from slimgraph.compiler.recipe import recipe_from_flags
    from slimgraph.models.kernels import two_layer_mlp
    from slimgraph.passes.pack_weights import SUFFIX

    options = CompileOptions(target="cuda", arch="sm_90", fp16=True, recipe=recipe_from_flags(quantize="int4"))
    module = optimize(two_layer_mlp(norm=norm), options).module
    assert sorted(w for w in module.weights if w != "g") == sorted(f"{w}.{kind}{SUFFIX}" for w in ("w1", "w2")
                                                                   for kind in ("qweight", "scales", "zeros"))
    target = resolve_target("cuda", None, gpu_arch="sm_90", fp16=True).tvm_target()
    kernels = gpu.lowered_kernels(module, target)
    with target:
        rules = sorted(gpu.schedule_prim_func(f, target, gpu.default_rules())[1] for f in kernels)
    assert rules.count("RowGEMV") == 2 and len(kernels) == 3 + norm, rules   # + the input's cast to float16
    factored = gpu.lowered_kernels(module, target, factored_rows=True)
    assert sorted(_chunks(f) for f in factored if _chunks(f)) == [32, 96] and len(factored) == 3   # 512 / 16, 768 / 8


def _chunks(func) -> int | None:
    """The number of chunks of the factored kernel ``func`` (values of its ``xs`` stage), else None."""
    sch = _schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).annotations.get(ROW_STAGE) == "sums":
            return int(sch.get(block).writes[0].source.shape[0])
    return None


@pytest.mark.gpu
@pytest.mark.skipif(detect_gpu_arch() is None, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("norm", [False, True])
def test_one_token_int4_mlp_matches_its_ir_on_the_gpu(tmp_path, norm):
    from golden_util import artifact_cosine_against_its_ir

    from slimgraph.compiler.driver import CompileOptions, compile_model
    from slimgraph.compiler.recipe import recipe_from_flags
    from slimgraph.models.kernels import two_layer_mlp

    options = CompileOptions(target="cuda", fp16=True, recipe=recipe_from_flags(quantize="int4"))
    assert artifact_cosine_against_its_ir(compile_model(two_layer_mlp(norm=norm), tmp_path / "cuda", options)) >= 0.999

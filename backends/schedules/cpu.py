"""Default (untuned) x86 CPU schedules for every TIR PrimFunc of a Relax module.

TVM's Relax CPU pipeline lowers fused PrimFuncs without any schedule, i.e. as
scalar single-threaded loop nests. ``schedule_cpu_module`` gives each PrimFunc
a deterministic hand-written schedule chosen from its block structure:

* GEMV (one output row): the weights streamed once, dequantized in registers (``_gemv``);
* a few rows against many k-contiguous rows (decoding attention scores over the KV cache;
  ``_gemv``);
* GEMM / batch GEMM with fused prologue and epilogue: packed B panels and a
  register-blocked micro kernel (``_matmul``);
* row kernels (softmax, layer norm, RMS norm): parallel rows, reductions as
  vector partial sums (``_generic``);
* other reductions (mean/sum over other axes ...): DLight's CPU rule, parallel
  rows, vectorized element-wise stages (``_generic``);
* injective kernels (element-wise, broadcast, transpose, reshape, concat,
  take): parallel x vectorized fused loops (``_generic``);
* anything else: parallel leading spatial loops (``_generic``).

Rules are tried in that order on a fresh ``Schedule``; a rule that does not
apply or raises is skipped, so scheduling never breaks the build.
"""

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.target import Target
from tvm.target import codegen
from tvm.target.codegen import llvm_get_vector_width

from . import _fastmath, _generic, _gemv, _indices, _integer_gemv, _matmul, _quantized_gemv

SCHEDULED_ATTR = "tirx.is_scheduled"


def _vector_lanes(target: Target, bits: int = 32) -> int:
    """fp32 lanes of the widest vector register (16 on AVX-512)."""
    width = llvm_get_vector_width(target)
    return max(width, 128) // bits


def panel_columns(target: Target) -> int:
    """float32 columns of the GEMM micro tile (four vector registers): the panel width of packed weights."""
    return _vector_lanes(target) * _matmul.NR_VECTORS


def _num_cores(target: Target) -> int:
    """Cores the kernels are built for (the target's ``num-cores``, default 1)."""
    return int(target.attrs.get("num-cores", 1))


def _rules(target: Target, lanes: int):
    """Candidate schedules, most specific first. Each mutates a Schedule and
    may return a replacement Schedule."""

    def gemv(sch):
        if not _gemv.is_gemv(sch):
            raise ValueError("not a GEMV")
        _gemv.schedule_gemv(sch, lanes, _num_cores(target))

    return [
        ("quantized_gemv", lambda sch: _quantized_gemv.schedule(sch, lanes, _num_cores(target))),
        ("gemv", gemv),
        ("row_dots", lambda sch: _gemv.schedule_row_dots(sch, lanes)),
        ("gemm", lambda sch: _matmul.schedule_gemm(sch, lanes, _num_cores(target))),
        ("rows", lambda sch: _generic.schedule_rows(sch, lanes)),
        ("row_reduction", lambda sch: _generic.schedule_row_reduction(sch, target)),
        ("injective", lambda sch: _generic.schedule_injective(sch, lanes)),
        ("fallback", lambda sch: _generic.schedule_fallback(sch, lanes)),
    ]


def schedule_prim_func(func: tirx.PrimFunc, target: Target) -> tuple[tirx.PrimFunc, str]:
    """Schedule one PrimFunc; returns (scheduled function, rule name).

    The function is returned unscheduled (rule "none") if every rule fails. Index arithmetic
    over symbolic dims is folded first (``_indices``)."""
    lanes = _vector_lanes(target)
    func = _indices.simplify_indices(func)
    for name, rule in _rules(target, lanes):
        sch = s_tir.Schedule(func, error_render_level="none")
        try:
            result = rule(sch)
            if isinstance(result, tirx.PrimFunc):     # a rule that edits the scheduled function
                return result, name
            sch = result if isinstance(result, s_tir.Schedule) else sch
            return sch.mod["main"], name
        except Exception:  # pylint: disable=broad-except
            continue
    return func, "none"


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get(SCHEDULED_ATTR, False))


def schedule_cpu_module(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """Return a new IRModule where every tirx.PrimFunc got a default CPU schedule
    (functions already scheduled are left alone)."""
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
            continue
        scheduled, _ = schedule_prim_func(func, target)
        mod[gvar] = scheduled.with_attr(SCHEDULED_ATTR, True)
    return mod


def schedule_pass(target: Target) -> tvm.transform.Pass:
    """``schedule_cpu_module`` as a module pass."""

    @tvm.transform.module_pass(opt_level=0, name="SlimgraphScheduleCPU")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return schedule_cpu_module(mod, target)

    return _pass


@tvm.transform.module_pass(opt_level=0, name="SlimgraphMarkNoAlias")
def mark_all_noalias(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Give every PrimFunc ``tirx.noalias``, including the VM's ``shape_func``.

    Works around TVM 0.27's LLVM codegen, where the alphabetically last PrimFunc's ``tirx.noalias``
    decides aliasing for every kernel of the module: when the VM's shape function (which has no
    such attribute) sorts last, LLVM must assume buffers alias and spills the GEMM accumulators on
    every k step (2-2.5x slower matmuls in modules with a symbolic dim). Shape functions write
    only their own buffer, so the attribute is true for them too.
    """
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tirx.noalias", False):
            mod[gvar] = func.with_attr("tirx.noalias", True)
    return mod


def lowering_passes(target: Target) -> list:
    """Relax -> one unscheduled TIR kernel per slimgraph-fused function (what tuning extracts)."""
    return cpu_pipeline.library_dispatch_passes(target) + [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        _quantized_gemv.factor_quantized_gemv(codegen.target_has_features(_integer_gemv.TARGET_FEATURE, target)),
        _fastmath.fast_math_pass,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseTIR(),
    ]


def build_pipeline(target: Target, tuned: tvm.transform.Pass | None = None) -> tvm.transform.Pass:
    """The Relax pipeline of ``relax.get_default_pipeline`` for llvm, with three changes.

    * Fusion is slimgraph's: TVM's ``FuseOps`` is not run; ``FuseTIR`` merges each of slimgraph's
      fused functions (marked ``Primitive``) into one kernel, and every other op stays its own kernel.
    * TVM's ``FoldConstant`` is not run either: slimgraph folds constants in its own IR, and TVM's
      would turn constant subexpressions inside fused functions into tensor constants, which
      ``FuseTIR`` rejects.
    * Kernels get schedules after ``FuseTIR``: first those of a tuning database (``tuned``, see
      ``backends.tuning``), then this package's defaults for the rest.
    ``_fastmath`` swaps float32 exp/sigmoid/erf/softmax/gelu for vectorizable polynomial forms
    (libm calls would serialize the vector loops).
    Use as ``tvm.compile(mod, target, relax_pipeline=build_pipeline(target))``.
    """
    passes = (
        lowering_passes(target)
        + ([tuned] if tuned is not None else [])
        + [schedule_pass(target)]
        + cpu_pipeline.dataflow_lower_passes(target)
        + cpu_pipeline.finalize_passes(target)
        + [mark_all_noalias]
    )

    @tvm.transform.module_pass(opt_level=0, name="SlimgraphCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline

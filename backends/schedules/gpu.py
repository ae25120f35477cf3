"""Default (untuned) CUDA schedules and the Relax pipeline for GPU targets.

Fusion is slimgraph's, as on CPUs: each fused function (marked ``Primitive``) becomes one kernel
through ``FuseTIR``; TVM's ``FuseOps`` and ``FoldConstant`` are not run. Every kernel then gets a
GPU schedule from TVM's DLight rules, tried in this order:

* ``RowGEMV`` (slimgraph's, :mod:`.gpu_row_gemv`): one-token products over quantized words
  stored K-contiguous per output, one warp per output with 8-byte loads (and, where a benchmark asks
  for them, the factored kernels of :mod:`.gpu_factored_gemv` and :mod:`.gpu_norm_prologue`);
* ``LowBatchGEMV`` / ``GEMV``: matrix-vector products (decoding, T=1), one warp-cooperative
  reduction per output block; a fused ``dequantize`` prologue is inlined, so packed int4/int8
  words are read from memory and unpacked in registers (no float copy of the weights);
* ``ColumnGEMV`` (slimgraph's, :mod:`.gpu_gemv`): the same products over slimgraph's ``[K, N]``
  weight layout, which DLight's GEMV does not schedule on CUDA: column threads splitting the rows,
  or vector loads with the rows split over a warp's lanes, chosen by shape;
* ``Matmul``: tiled GEMM through shared memory (prefill, batched tokens), prologues inlined;
* ``RMSNorm`` / ``Reduction`` / ``GeneralReduction``: row reductions, softmax, layer norms;
* ``RowChain`` (:mod:`.gpu_row_chain`): per-row values broadcast over a last block in one kernel
  (a one-token softmax over a single key, whose unit reductions DLight sees as spatial);
* ``Transpose`` and ``Fallback``: layout and element-wise kernels, one thread per element.

Rules are tried in that order on each kernel; one that does not apply, or raises (some DLight
rules trip over symbolic shapes), is skipped, so scheduling never breaks the build. Kernels that are
already scheduled (from a tuning database) are left alone.

Kernels that read or write ``bool`` tensors (attention masks) run with scalar loops only: TVM's
CUDA code generator turns a 2-lane ``bool`` load into a ``ushort2`` load from the 1-byte ``bool``
pointer, which reads the wrong bytes and faults on addresses that are not 4-byte aligned
(``cudaErrorMisalignedAddress``). Calls of
the Relax VM that only depend on static shapes are captured into a CUDA graph at run time
(``RewriteCUDAGraph``), which removes the per-kernel launch cost of small-batch steps.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.s_tir import dlight as dl
from tvm.target import Target

from slimgraph.backends.schedules.gpu_dequantize import codes_through_bits_pass, weights_in_float32_pass
from slimgraph.backends.schedules.gpu_factored_gemv import factor_row_products_pass
from slimgraph.backends.schedules.gpu_norm_prologue import merge_norms_into_row_products_pass
from slimgraph.backends.schedules.gpu_gemv import ColumnGEMV
from slimgraph.backends.schedules.gpu_row_chain import RowChain
from slimgraph.backends.schedules.gpu_row_gemv import RowGEMV


class StaticShapesOnly:
    """A rule applied only to kernels whose buffers all have static shapes: ``LowBatchGEMV`` and
    ``Transpose`` size per-thread or shared buffers by the data's dims, which a symbolic T leaves
    unknown (TVM then fails: "Can only handle constant size stack allocation")."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        dims = [d for buf in func.params for d in getattr(buf, "shape", ())]
        if any(not isinstance(d, tirx.IntImm) for d in dims):
            return None
        return self.rule.apply(func, target, tunable)


def default_rules() -> list:
    return [
        RowGEMV(),
        dl.gpu.GEMV(),
        StaticShapesOnly(dl.gpu.LowBatchGEMV()),
        ColumnGEMV(),
        dl.gpu.Matmul(),
        dl.gpu.RMSNorm(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        StaticShapesOnly(dl.gpu.Transpose()),
        StaticShapesOnly(RowChain()),
        dl.gpu.Fallback(),
    ]


SCHEDULED_ATTR = "tirx.is_scheduled"


def schedule_prim_func(func: tirx.PrimFunc, target: Target, rules: list) -> tuple[tirx.PrimFunc, str | None]:
    """The function scheduled by the first rule that applies (and its class name), or (func, None)."""
    for rule in rules:
        try:
            space = rule.apply(func, target, False)
        except Exception:  # pylint: disable=broad-except
            continue
        if space is None:
            continue
        sch = space[0] if isinstance(space, list) else space
        if unbound_blocks(sch):
            continue
        name = type(getattr(rule, "rule", rule)).__name__
        return sch.mod["main"].with_attr(SCHEDULED_ATTR, True), name
    return func, None


def unbound_blocks(sch: s_tir.Schedule) -> list[str]:
    """Names of the blocks of a scheduled kernel that no GPU thread loop encloses. Such a block
    would run on the host and dereference device pointers (a segfault): DLight's ``Transpose``
    schedules only the transpose of a fused function and leaves the blocks after it unbound."""
    unbound, pending = [], list(sch.get_child_blocks(sch.get_sblock("root")))
    while pending:  # a block under a thread loop runs on the device with all blocks inside it
        block = pending.pop()
        if any(sch.get(loop).kind == tirx.ForKind.THREAD_BINDING for loop in sch.get_loops(block)):
            continue
        inner = list(sch.get_child_blocks(block))
        if not inner:
            unbound.append(sch.get(block).name_hint)
        pending += inner
    return unbound


def touches_bool_memory(func: tirx.PrimFunc) -> bool:
    """Whether a kernel has a ``bool`` parameter or a ``bool`` buffer of its own."""
    buffers = [p for p in func.params if isinstance(p, tirx.Buffer) and not isinstance(p.ty, tvm.ir.PrimType)]
    body = func.body
    if isinstance(body, s_tir.SBlockRealize):
        buffers += list(body.block.alloc_buffers)
    return any(buf.dtype == "bool" for buf in buffers)


def scalar_bool_access(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its vectorized loops made serial when it touches ``bool`` memory."""
    if not touches_bool_memory(func):
        return func
    return tirx.transform.VectorizeLoop(False)(tvm.IRModule({"main": func}))["main"]


def schedule_kernel(func: tirx.PrimFunc, target: Target, rules: list) -> tirx.PrimFunc:
    """One kernel as the build runs it: the first rule's schedule unless it is already scheduled
    (from a tuning database), then serial loops where it touches ``bool`` memory."""
    if not func.attrs.get(SCHEDULED_ATTR, False):
        func, _ = schedule_prim_func(func, target, rules)
    return scalar_bool_access(func)


def schedule_pass(target: Target, rules: list) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="SlimgraphScheduleGPU")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc):
                mod[gvar] = schedule_kernel(func, target, rules)
        return mod

    return _pass


def lowering_passes(target: Target, *, factored_rows: bool = False) -> list:
    """Relax -> one unscheduled TIR kernel per slimgraph-fused function (what tuning extracts).
    ``factored_rows`` lowers one-token products over transposed words as factored kernels, with the
    RMS norms only they read merged in (:mod:`.gpu_factored_gemv`); off in builds, where it measured
    slower (its per-block prologue), kept for the benchmarks that compare the two."""
    return cuda_pipeline.library_dispatch_passes(target) + [
        *([merge_norms_into_row_products_pass()] if factored_rows else []),
        weights_in_float32_pass(),
        *([factor_row_products_pass()] if factored_rows else []),
        codes_through_bits_pass(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseTIR(),
    ]


def lowered_kernels(module, target: Target, *, factored_rows: bool = False) -> list[tirx.PrimFunc]:
    """The unscheduled TIR kernels of a slimgraph module (fused, lowered as a CUDA build lowers it)."""
    from slimgraph.backends.relax_lowering import lower_to_relax
    from slimgraph.passes.fusion import fuse

    with target, tvm.transform.PassContext(opt_level=3):
        lowered = tvm.transform.Sequential(lowering_passes(target, factored_rows=factored_rows))(lower_to_relax(fuse(module).module).ir_module)
    return [f for _, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)]


def build_pipeline(target: Target, *, schedule: bool = True, cuda_graph: bool = True,
                   tuned: tvm.transform.Pass | None = None) -> tvm.transform.Pass:
    """Relax pipeline for CUDA: slimgraph's fusion, tuned schedules where a database has them,
    DLight schedules for the rest, CUDA-graph capture."""
    rules = default_rules() if schedule else [dl.gpu.Fallback()]
    passes = (lowering_passes(target) + ([tuned] if tuned is not None else []) + [schedule_pass(target, rules)]
              + cuda_pipeline.dataflow_lower_passes(target) + cuda_pipeline.finalize_passes(target))

    @tvm.transform.module_pass(opt_level=0, name="SlimgraphCUDAPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        config = {"relax.backend.use_cuda_graph": cuda_graph}
        with target, tvm.transform.PassContext(opt_level=3, config=config):
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline

"""Stage-3 GPU kernels: one-token int4 products (dequantize fused into the GEMV) under both CUDA
schedules of ``backends/schedules/gpu_gemv.py`` and over transposed words, side by side on the GPU machine.

    python bench/stage3_cuda_gemv.py prepare               # here: build the kernels into .device/gemv
    python bench/stage3_cuda_gemv.py measure --out $OUT    # GPU machine (runtime bundle sourced)
    python bench/stage3_cuda_gemv.py report RUN.json       # here: table + bench/results/stage3-cuda-gemv-<date>.json

For each product shape [K -> N] of SmolLM2-135M and of a TinyLlama-1.1B-shaped model (int4, group
128, float16 activations), the kernel is built over words stored [K / 8, N] with the "column-threads"
and the "vector-lanes" schedule, and over words stored transposed ([N, K / 8], as ``pack_weights``
stores them for CUDA) with DLight's ``GEMV`` rule ("transposed-gemv") and with slimgraph's ``RowGEMV``
under several plans ("row-warps" is its default plan; "row-vV-wW" fixes V words per lane load and W warps
per block, "-global" reads the activation from global memory instead of a shared copy), and, where it
applies, as the factored kernel of ``gpu_factored_gemv`` under RowGEMV ("row-factored", "-wW" with W warps
per block); the other transposed kernels keep the dequantize form. "chosen" is the
kernel a CUDA build uses for that shape (the layout ``reads_words_transposed`` picks, then the first rule
that applies).
On the GPU each one runs on random words, scales and zero points whose copies together exceed the
L2 cache (160 MB, rotated call by call, so every call reads its weights from device memory); its
GPU time per call comes from CUPTI (torch.profiler), its result is checked against a numpy
reference, and its bytes of weights read per second are set against the device-to-device copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage3_cuda import copy_bandwidth  # noqa: E402

FOLDER = Path(__file__).resolve().parents[1] / ".device" / "gemv"
# [K, N] of the one-token products the builds run (q/k/v and gate/up merged by merge_parallel_products),
# then the separate q, k/v and gate/up products of an unmerged build
SHAPES = [(2048, 2560), (2048, 2048), (2048, 11264), (5632, 2048), (2048, 32000),
          (576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152),
          (2048, 256), (2048, 5632), (576, 192), (576, 1536)]
GROUP = 128
L2_ROTATION_BYTES = 160e6


def _product(rows: int, outputs: int, transposed: bool = False, factored: bool = False):
    """The fused one-token kernel ``cast(matmul(x, dequantize(words, scales, zeros)))`` as a CUDA build
    lowers it; ``transposed``: the words are a [N, K / 8, 1] weight read back through ``pack_weights``'
    chain; ``factored``: the factored kernel of ``gpu_factored_gemv`` wherever it applies."""
    from slimgraph.backends.schedules import gpu
    from slimgraph.backends.targets import resolve_target
    from slimgraph.models.kernels import int4_product

    target = resolve_target("cuda", None, gpu_arch="sm_90", fp16=True).tvm_target()
    module = int4_product(rows, outputs, group=GROUP, transposed=transposed)
    (func,) = gpu.lowered_kernels(module, target, factored_rows=factored)
    return func, target


TRANSPOSED = "transposed-gemv"
ROW_WARPS = "row-warps"
FACTORED = "row-factored"   # the factored kernel (gpu_factored_gemv) under RowGEMV's default plan
FACTORED_PLANS = {FACTORED: None, "row-factored-w8": 8, "row-factored-w2": 2}   # name: warps per block
ROW_PLANS = {f"row-v{v}-w{w}{'' if shared else '-global'}": (v, w, shared)
             for v, w, shared in [(4, 4, True), (4, 8, True), (4, 2, True), (2, 4, True), (4, 4, False), (2, 8, True)]}


def reads_transposed(name: str) -> bool:
    """Whether a kernel of this bench reads the words stored transposed, [N, K / 8, 1]."""
    return name == TRANSPOSED or name.startswith("row-")


def _row_kernels(func, target) -> dict:
    """The transposed-word kernel under RowGEMV's default plan and each plan of ROW_PLANS that applies."""
    from slimgraph.backends.schedules import gpu
    from slimgraph.backends.schedules.gpu_row_gemv import RowGEMV, RowPlan

    kernels = {}
    for name, plan in [(ROW_WARPS, None)] + [(n, RowPlan(v, w, shared)) for n, (v, w, shared) in ROW_PLANS.items()]:
        scheduled, rule = gpu.schedule_prim_func(func, target, [RowGEMV(plan)])
        if rule is not None:
            kernels[name] = scheduled
    return kernels


def prepare(_args) -> None:
    import tvm
    from tvm.s_tir import dlight as dl

    from slimgraph.backends.schedules import gpu
    from slimgraph.backends.schedules.gpu_gemv import SCHEDULES, ColumnGEMV
    from slimgraph.backends.schedules.gpu_row_gemv import RowGEMV, RowPlan
    from slimgraph.backends.targets_cuda import reads_words_transposed

    FOLDER.mkdir(parents=True, exist_ok=True)
    meta = {}
    for rows, outputs in SHAPES:
        func, target = _product(rows, outputs)
        kernels, chosen = {}, None
        with target:
            for name in (*SCHEDULES, None):
                scheduled, rule = gpu.schedule_prim_func(func, target, [ColumnGEMV(name)])
                if rule is None:
                    continue
                if name is None:
                    chosen = next(n for n, k in kernels.items() if k.script() == scheduled.script())
                    continue
                kernels[name] = scheduled
            transposed = _product(rows, outputs, transposed=True)[0]
            scheduled, rule = gpu.schedule_prim_func(transposed, target, [dl.gpu.GEMV()])
            assert rule == "GEMV", f"[{rows} -> {outputs}] transposed words scheduled by {rule}"
            kernels[TRANSPOSED] = scheduled
            kernels.update(_row_kernels(transposed, target))
            built = _product(rows, outputs, transposed=True, factored=True)[0]
            if built.script() != transposed.script():   # the factored kernel applies to this shape
                for name, warps in FACTORED_PLANS.items():
                    plan = RowPlan(1, warps) if warps else None
                    kernels[name] = gpu.schedule_prim_func(built, target, [RowGEMV(plan)])[0]
            if reads_words_transposed(rows, outputs):   # a build lowers the dequantize form
                default, rule = gpu.schedule_prim_func(transposed, target, gpu.default_rules())
                chosen = next(n for n, k in kernels.items() if reads_transposed(n) and k.script() == default.script())
            symbols = {name: name.replace("-", "_") for name in kernels}
            library = tvm.tirx.build(tvm.IRModule({symbols[n]: k.with_attr("global_symbol", symbols[n])
                                                   for n, k in kernels.items()}), target=target)
        library.export_library(str(FOLDER / f"gemv_{rows}x{outputs}.so"))
        meta[f"{rows}x{outputs}"] = {"library": f"gemv_{rows}x{outputs}.so", "kernels": symbols, "chosen": chosen}
        print(f"[{rows} -> {outputs}] built {sorted(kernels)}, a CUDA build takes {chosen}", flush=True)
    (FOLDER / "meta.json").write_text(json.dumps(meta, indent=1))


def _reference(x, words, scales, zeros, rows: int) -> np.ndarray:
    from slimgraph.compiler.ops.quantization import dequantize_reference

    weight = dequantize_reference(words, scales, zeros, bits=4, group_size=GROUP, rows=rows)
    return x.astype(np.float32)[0, 0] @ weight.astype(np.float16).astype(np.float32)


def _gpu_microseconds(call, calls: int) -> float:
    """Median GPU time of one kernel launch over ``calls`` launches (CUPTI)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            call(i)
        torch.cuda.synchronize()
    times = [e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return float(np.median(times))


def measure(args) -> None:
    import torch

    from slimgraph.backends.cuda_runtime import ensure_cuda_runtime

    ensure_cuda_runtime()
    import tvm

    folder, out = Path(args.folder), Path(args.out)
    meta = json.loads((folder / "meta.json").read_text())
    dev, rng = tvm.cuda(0), np.random.default_rng(0)
    result = {"device": torch.cuda.get_device_name(), "copy": copy_bandwidth(), "shapes": {}}
    for key, info in meta.items():
        rows, outputs = map(int, key.split("x"))
        groups = -(-rows // GROUP)
        words = rng.integers(0, 2 ** 32, size=(rows // 8, outputs), dtype=np.uint32)
        scales = (rng.random((groups, outputs)) * 0.02 + 0.001).astype(np.float16)
        zeros = rng.integers(0, 16, size=(groups, outputs)).astype(np.float16)
        x = rng.standard_normal((1, 1, rows)).astype(np.float16)
        reference = _reference(x, words, scales, zeros, rows)
        weight_bytes = words.nbytes + scales.nbytes + zeros.nbytes
        copies = int(min(64, max(2, -(-L2_ROTATION_BYTES // weight_bytes))))
        layouts = {"rows": words, TRANSPOSED: np.ascontiguousarray(words.T)[:, :, None]}
        x_dev, y_dev = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(np.zeros((1, 1, outputs), np.float16), dev)
        library = tvm.runtime.load_module(str(folder / info["library"]))
        rows_out, uploaded = {}, None
        # kernels of one layout in a row, so each layout's copies go to the GPU once
        for name, symbol in sorted(info["kernels"].items(), key=lambda kv: reads_transposed(kv[0])):
            layout = TRANSPOSED if reads_transposed(name) else "rows"
            if layout != uploaded:
                sets = [[tvm.runtime.tensor(a, dev) for a in (layouts[layout], scales, zeros)] for _ in range(copies)]
                uploaded = layout
            kernel = library[symbol]
            kernel(*sets[0], x_dev, y_dev)
            dev.sync()
            got = y_dev.numpy().astype(np.float32)[0, 0]
            error = float(np.abs(got - reference).max() / np.abs(reference).max())
            for i in range(copies):
                kernel(*sets[i], x_dev, y_dev)
            us = _gpu_microseconds(lambda i: kernel(*sets[i % copies], x_dev, y_dev), max(copies, 60))
            rows_out[name] = {"us": us, "tb_per_s": weight_bytes / us / 1e6, "relative_error": error}
            print(key, name, json.dumps(rows_out[name]), flush=True)
        del sets
        result["shapes"][key] = {"weight_bytes": weight_bytes, "chosen": info["chosen"], "kernels": rows_out}
        out.mkdir(parents=True, exist_ok=True)
        (out / "stage3-cuda-gemv.json").write_text(json.dumps(result, indent=1))


def report(args) -> None:
    from common import write_results

    result = json.loads(Path(args.result).read_text())
    copy = result["copy"]["tb_per_s"]
    print(f"{result['device']}: copy bandwidth {copy:.2f} TB/s (read + write); GPU us per call, weights from DRAM")
    names = ("column-threads", "vector-lanes", TRANSPOSED, ROW_WARPS, *FACTORED_PLANS, *ROW_PLANS)
    print(f"  {'product':16s} {'MB':>6s} " + " ".join(f"{n:>16s}" for n in names) + "  chosen")
    for key, row in result["shapes"].items():
        cells = []
        for name in names:
            k = row["kernels"].get(name)
            cells.append(f"{k['us']:6.2f} ({100 * k['tb_per_s'] / copy:3.0f}%)" if k else "-")
            if k and k["relative_error"] > 1e-2:
                cells[-1] += " WRONG"
        print(f"  [{key.replace('x', ' -> ')}]".ljust(18) + f"{row['weight_bytes'] / 1e6:6.2f} "
              + " ".join(f"{c:>16s}" for c in cells) + f"  {row['chosen']}")
    print(f"\nwrote {write_results('stage3-cuda-gemv', result)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("prepare")
    m = sub.add_parser("measure")
    m.add_argument("--folder", default=str(FOLDER))
    m.add_argument("--out", default=".")
    r = sub.add_parser("report")
    r.add_argument("result")
    args = parser.parse_args()
    {"prepare": prepare, "measure": measure, "report": report}[args.step](args)


if __name__ == "__main__":
    main()

"""Stage-1 latency: untuned slimgraph vs PyTorch eager vs ONNX Runtime, side by side, 2 threads.

    python bench/stage1_latency.py [--models minilm,smollm2] [--threads 2] [--repeats 10] [--static]

For each model one forward pass at batch 1, T=128 (MiniLM: last_hidden_state; SmolLM2: logits) is
timed by wall clock around each runtime's own call, after warm-up, as the median of --repeats runs.
slimgraph compiles the model (default passes and CPU schedules, no tuning) with T symbolic, and with
--static also with T fixed to 128. Outputs are checked against torch (cosine) so that no runtime is
timed doing different work. Results go to bench/results/stage1-<date>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK_DIR, cosine, machine_description, measure, pin_threads, write_results  # noqa: E402

T = 128


def make_inputs(name: str, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (1, T)).astype(np.int64)
    if name == "minilm":
        return {"input_ids": ids, "attention_mask": np.ones((1, T), np.int64),
                "token_type_ids": np.zeros((1, T), np.int64)}
    return {"input_ids": ids}


def torch_model(name: str, folder: str):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if name == "minilm" else AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    if name != "minilm":
        model.config.use_cache = False
    return model


def run_torch(model, name: str, inputs: dict):
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def call():
        with torch.inference_mode():
            out = model(**tensors, use_cache=False) if name != "minilm" else model(**tensors)
        return (out.last_hidden_state if name == "minilm" else out.logits).numpy()

    return call


def onnx_file(name: str, folder: str) -> Path:
    """Export once into bench/.work (the same fp32 weights the other runtimes use)."""
    path = WORK_DIR / f"{name}.onnx"
    if path.is_file():
        return path
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    if name == "minilm":
        from slimgraph.compiler.frontends.onnx_export import export_hf_to_onnx

        export_hf_to_onnx(folder, path)
    else:
        from onnx_causal_lm import export_causal_lm

        export_causal_lm(folder, path)
    return path


def run_ort(path: Path, inputs: dict, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feed = {k: v for k, v in inputs.items() if k in names}
    return lambda: session.run(None, feed)[0]


def run_slimgraph(name: str, inputs: dict, *, static: bool):
    import slimgraph
    from slimgraph.compiler.driver import CompileOptions, compile_model

    out = WORK_DIR / f"{name}-slimgraph{'-static' if static else ''}"
    shapes = {"input_ids": inputs["input_ids"].shape} if static else {}
    compile_model(name, out, CompileOptions(shapes=shapes, force=True))
    model = slimgraph.load(out)
    feed = {k: v for k, v in inputs.items() if k in model.input_names}
    report = __import__("json").loads((out / "report.json").read_text())
    return (lambda: model(**feed)[0]), report["compile_seconds"]["total"]


def bench_model(name: str, args) -> dict:
    from slimgraph.models.registry import resolve_model

    folder = str(resolve_model(name).path)
    torch_m = torch_model(name, folder)
    inputs = make_inputs(name, torch_m.config.vocab_size)
    rows = {}
    ref_call = run_torch(torch_m, name, inputs)
    reference = ref_call()
    rows["torch eager"] = measure(ref_call, repeats=args.repeats)
    ort_call = run_ort(onnx_file(name, folder), inputs, args.threads)
    rows["onnxruntime"] = {**measure(ort_call, repeats=args.repeats), "cosine": cosine(ort_call(), reference)}
    variants = [False, True] if args.static else [False]
    for static in variants:
        call, compile_s = run_slimgraph(name, inputs, static=static)
        label = "slimgraph (T=128 fixed)" if static else "slimgraph (T symbolic)"
        rows[label] = {**measure(call, repeats=args.repeats), "cosine": cosine(call(), reference),
                       "compile_s": compile_s}
    return rows


def print_table(name: str, rows: dict) -> None:
    base_torch = rows["torch eager"]["median_ms"]
    base_ort = rows["onnxruntime"]["median_ms"]
    print(f"\n{name} (batch 1, T={T})")
    print(f"{'runtime':28s} {'median ms':>10s} {'min..max':>18s} {'x torch':>8s} {'x ORT':>7s} {'cosine':>9s}")
    for label, r in rows.items():
        spread = f"{r['min_ms']:.1f}..{r['max_ms']:.1f}"
        cos = f"{r['cosine']:.6f}" if "cosine" in r else "ref"
        print(f"{label:28s} {r['median_ms']:10.2f} {spread:>18s} {r['median_ms'] / base_torch:8.2f} "
              f"{r['median_ms'] / base_ort:7.2f} {cos:>9s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--static", action="store_true", help="also compile with T fixed to 128")
    args = parser.parse_args()
    pin_threads(args.threads)
    results = {"machine": machine_description(), "threads": args.threads, "T": T, "models": {}}
    for name in args.models.split(","):
        rows = bench_model(name, args)
        results["models"][name] = rows
        print_table(name, rows)
    print(f"\nwrote {write_results('stage1', results)}")


if __name__ == "__main__":
    main()

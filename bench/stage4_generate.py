"""Generation benchmark: SmolLM2-135M on this machine, slimgraph against PyTorch, ONNX Runtime, llama.cpp.

    python bench/stage4_generate.py setup      # llama-cpp-python from its PyPI source (minutes; benchmark only)
    python bench/stage4_generate.py prepare    # slimgraph artifacts, ONNX exports (into bench/.work/stage4)
    python bench/stage4_generate.py measure    # every tool, one subprocess each -> results JSON, RESULTS.md, PNG
    python bench/stage4_generate.py measure --only llama.cpp-q4_1   # re-measure some rows, keep today's others
    python bench/stage4_generate.py report F   # RESULTS.md and the PNG again from a results JSON

Every tool does the same work at the same thread count: the same 128-token prompt, greedy
decoding of 128 new tokens with end-of-sequence ignored. Figures per tool (median of REPEATS runs,
with min/max):

* ``prefill_ms``: the prompt's forward pass with the KV cache filled (logits of the last token);
* ``decode_tokens_per_s``: 127 decode steps (tokens 2..128) over their wall time;
* ``peak_rss_mb``: the tool's process peak resident memory (its own subprocess: runtime, weights,
  caches; ``ru_maxrss``);
* ``size_mb``: the artifact's or model file's bytes on disk;
* ``tokens``: the 128 greedy tokens, compared with transformers' eager greedy tokens.

A tool that cannot run here is listed with the reason. slimgraph's decode memory is also traced
over 512 decode steps (resident memory every 64 steps).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, WORK_DIR  # noqa: E402

WORK = WORK_DIR / "stage4"
THREADS = 2
PROMPT_TOKENS = 128
NEW_TOKENS = 128
REPEATS = 3
CONTEXT = 1024
MEMORY_STEPS = 512
SLIMGRAPH_VARIANTS = {  # int4-a8: 8-bit activation codes per 32 inputs, as llama.cpp's Q8_1 for its Q4_1 products
    "fp32": {}, "int8": {"quantize": "int8", "group_size": 0}, "int4": {"quantize": "int4", "group_size": 128},
    "int4-a8": {"quantize": "int4", "group_size": 128, "activations": "int8"},
    # llama.cpp's formats for this GGUF: 4-bit groups of 32 (Q4_1), an 8-bit LM head (Q8_0), 8-bit inputs
    "llama-cpp-formats": {"recipe_file": str(Path(__file__).resolve().parent / "recipes" / "llama-cpp-q4_1.toml")},
}
TOOLS = ["torch-eager", "torch-compile", "ort-fp32", "ort-int4", "llama.cpp-q4_1",
         "slimgraph-fp32", "slimgraph-int8", "slimgraph-int4", "slimgraph-int4-a8", "slimgraph-llama-cpp-formats"]


# ----------------------------------------------------------------------------- shared inputs
def prompt_ids() -> list[int]:
    """The first 128 tokens of the fixed Wikipedia evaluation text."""
    from bench.ort_quant import eval_tokens
    from slimgraph.models.registry import resolve_model

    return [int(t) for t in eval_tokens(str(resolve_model("smollm2").path), PROMPT_TOKENS)[:PROMPT_TOKENS]]


def timed_runs(run_once) -> dict:
    """run_once() -> (prefill_s, decode_s, tokens); REPEATS runs after two warm-ups (torch.compile
    compiles the prefill and decode shapes of both generate calls in them)."""
    run_once()
    run_once()
    runs = [run_once() for _ in range(REPEATS)]
    prefill = [r[0] * 1e3 for r in runs]
    rates = [(NEW_TOKENS - 1) / r[1] for r in runs]
    return {"prefill_ms": _stats(prefill), "decode_tokens_per_s": _stats(rates), "tokens": runs[-1][2]}


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----------------------------------------------------------------------------- the tools
def run_slimgraph(variant: str, ids: list[int]) -> dict:
    import slimgraph
    from slimgraph.backends.sampling import SamplingOptions

    path = WORK / f"slimgraph-{variant}"
    model = slimgraph.load(path, threads=THREADS)
    gen = model.generator
    options = SamplingOptions(max_new_tokens=NEW_TOKENS)

    def once():
        start = time.perf_counter()
        tokens = list(gen.stream(ids, options))
        total = time.perf_counter() - start       # decode = the steps after the first token, choices included
        return gen.stats.prefill_seconds, total - gen.stats.first_token_seconds, tokens

    result = timed_runs(once)
    result["size_mb"] = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
    result["decode_memory_mb"] = decode_memory(gen, ids[:1])
    return result


def decode_memory(gen, first: list[int]) -> dict:
    """Resident memory every 64 steps of MEMORY_STEPS decode steps (flat: nothing grows per token)."""
    gen.prefill(first)
    trace, token = {}, first[0]
    for step in range(1, MEMORY_STEPS + 1):
        token = int(gen.decode(token).argmax())
        if step == 1 or step % 64 == 0:
            trace[step] = rss_mb()
    return trace


def _torch_model():
    import torch

    from slimgraph.compiler.frontends.huggingface import load_hf_model
    from slimgraph.models.registry import resolve_model

    torch.set_num_threads(THREADS)
    return load_hf_model(resolve_model("smollm2").path)


def run_torch(ids: list[int], compiled: bool) -> dict:
    import torch

    model = _torch_model()
    prompt = torch.tensor([ids])
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, min_new_tokens=NEW_TOKENS,
                  pad_token_id=0, use_cache=True)
    if compiled:
        kwargs["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward, dynamic=False)

    def once():
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, **dict(kwargs, min_new_tokens=1))
            t1 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=NEW_TOKENS, **kwargs)
            t2 = time.perf_counter()
        prefill = t1 - t0
        return prefill, (t2 - t1) - prefill, out[0, len(ids):].tolist()

    result = timed_runs(once)
    from slimgraph.models.registry import resolve_model

    result["size_mb"] = sum(f.stat().st_size for f in Path(resolve_model("smollm2").path).glob("*.safetensors")) / 1e6
    return result


def run_ort(ids: list[int], variant: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    folder = WORK / f"ort-{variant}"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
    prefill = ort.InferenceSession(str(folder / "prefill.onnx"), opts, providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(folder / "decode.onnx"), opts, providers=["CPUExecutionProvider"])
    past_names = [i.name for i in decode.get_inputs()][1:]

    def once():
        t0 = time.perf_counter()
        logits, *present = prefill.run(None, {"input_ids": np.array([ids], np.int64)})
        t1 = time.perf_counter()
        tokens = [int(logits[0, -1].argmax())]
        for _ in range(NEW_TOKENS - 1):
            feed = {"input_ids": np.array([[tokens[-1]]], np.int64), **dict(zip(past_names, present))}
            logits, *present = decode.run(None, feed)
            tokens.append(int(logits[0, -1].argmax()))
        return t1 - t0, time.perf_counter() - t1, tokens

    result = timed_runs(once)
    result["size_mb"] = (folder / "decode.onnx").stat().st_size / 1e6
    return result


def run_llama_cpp(ids: list[int]) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from slimgraph.models.packaged import smollm2_gguf

    gguf = smollm2_gguf()
    llm = Llama(model_path=str(gguf), n_ctx=CONTEXT, n_threads=THREADS, n_threads_batch=THREADS,
                n_batch=PROMPT_TOKENS, verbose=False)

    def last_argmax() -> int:       # the last position's logits, read in place from llama.cpp
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    def once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        tokens = [last_argmax()]
        for _ in range(NEW_TOKENS - 1):
            llm.eval([tokens[-1]])
            tokens.append(last_argmax())
        return t1 - t0, time.perf_counter() - t1, tokens

    result = timed_runs(once)
    result["size_mb"] = gguf.stat().st_size / 1e6
    return result


def run_tool(tool: str) -> dict:
    ids = prompt_ids()
    if tool.startswith("slimgraph-"):
        result = run_slimgraph(tool.split("-", 1)[1], ids)
    elif tool in ("torch-eager", "torch-compile"):
        result = run_torch(ids, compiled=tool == "torch-compile")
    elif tool.startswith("ort-"):
        result = run_ort(ids, tool.split("-", 1)[1])
    else:
        result = run_llama_cpp(ids)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# ----------------------------------------------------------------------------- prepare / setup
def prepare() -> None:
    from bench.onnx_causal_lm import export_causal_lm_with_cache
    from bench.ort_quant import quantize_matmul_nbits
    from slimgraph.compiler.driver import CompileOptions, compile_model
    from slimgraph.compiler.recipe import recipe_from_flags
    from slimgraph.models.registry import resolve_model

    WORK.mkdir(parents=True, exist_ok=True)
    for variant, flags in SLIMGRAPH_VARIANTS.items():
        out = WORK / f"slimgraph-{variant}"
        if not out.exists():
            print(f"compiling slimgraph {variant} -> {out}", flush=True)
            compile_model("smollm2", out, CompileOptions(kv_cache=CONTEXT, recipe=recipe_from_flags(**flags)))
    fp32 = WORK / "ort-fp32"
    if not (fp32 / "decode.onnx").is_file():
        print("exporting ONNX prefill/decode with the KV cache", flush=True)
        export_causal_lm_with_cache(str(resolve_model("smollm2").path), fp32)
    int4 = WORK / "ort-int4"
    for name in ("prefill.onnx", "decode.onnx"):
        if not (int4 / name).is_file():
            print(f"ONNX Runtime MatMulNBits int4 (group 128, asymmetric) -> {int4 / name}", flush=True)
            quantize_matmul_nbits(fp32 / name, int4 / name, method="default", bits=4, block_size=128, symmetric=False)


def setup() -> None:
    """llama-cpp-python for the llama.cpp row: built from its PyPI source (several minutes). The
    native build (GGML_NATIVE) enabled AMX kernels here and crashed on the first forward pass, so
    the instruction sets are named: AVX2, FMA, F16C, AVX-512 (what this machine's CPUs have)."""
    flags = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-binary", "llama-cpp-python", "llama-cpp-python"],
                   check=True, env={**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", flags)})


# ----------------------------------------------------------------------------- measure / report
def _unavailable(tool: str) -> str | None:
    if tool.startswith("llama.cpp"):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return "llama-cpp-python is not installed (python bench/stage4_generate.py setup builds it)"
    if tool.startswith(("slimgraph-", "ort-")) and not (WORK / tool).exists():
        return f"{WORK / tool} is missing (python bench/stage4_generate.py prepare)"
    return None


def measure(only: list[str] | None = None) -> Path:
    """Every tool (or only those named, keeping today's other rows from the results file)."""
    from bench.common import machine_description

    rows = {}
    slug_path = RESULTS_DIR / f"{machine_slug(machine_description())}-{time.strftime('%Y-%m-%d')}.json"
    if only and slug_path.is_file():
        rows = json.loads(slug_path.read_text())["rows"]
    for tool in (only or TOOLS):
        reason = _unavailable(tool)
        if reason is None:
            print(f"measuring {tool} ...", flush=True)
            done = subprocess.run([sys.executable, __file__, "one", tool], capture_output=True, text=True, timeout=1800)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            if done.returncode == 0 and lines:
                rows[tool] = json.loads(lines[-1])
                continue
            reason = f"failed (exit {done.returncode}): " + (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {tool}: not run: {reason}", flush=True)
        rows[tool] = {"not_run": reason}
    reference = rows.get("torch-eager", {}).get("tokens")
    for row in rows.values():
        if "tokens" in row and reference:
            row["same_tokens_as_torch"] = sum(a == b for a, b in zip(row["tokens"], reference))
    data = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d"), "threads": THREADS,
            "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "rows": rows}
    if "llama_cpp" in sys.modules or _unavailable("llama.cpp-q4_1") is None:
        import llama_cpp

        data["machine"]["versions"]["llama_cpp_python"] = llama_cpp.__version__
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{machine_slug(data['machine'])}-{data['date']}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    report(path)
    return path


def machine_slug(machine: dict) -> str:
    import platform

    return f"{platform.machine()}-{machine['cores']}cores"


def report(path: Path) -> None:
    from bench.stage4_report import write_chart, write_markdown

    path = Path(path).resolve()
    data = json.loads(path.read_text())
    md = write_markdown(data, path)
    png = write_chart(data, path.with_suffix(".png"))
    print(md.read_text())
    print(f"wrote {path}, {md}, {png}")


def main(argv: list[str]) -> None:
    command = argv[0] if argv else "measure"
    if command == "one":
        print(json.dumps(run_tool(argv[1])))
    elif command == "prepare":
        prepare()
    elif command == "setup":
        setup()
    elif command == "report":
        report(Path(argv[1]))
    elif argv[1:2] == ["--only"]:
        measure(argv[2].split(","))
    else:
        measure()


if __name__ == "__main__":
    main(sys.argv[1:])

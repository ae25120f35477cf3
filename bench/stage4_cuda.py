"""GPU generation benchmark: SmolLM2-135M decode tokens/s, slimgraph fp16 / int4 against torch eager and
torch.compile fp16 (transformers, static KV cache), in one run on the GPU machine.

    python bench/stage4_cuda.py prepare                      # here: CUDA --kv-cache builds, packed for the device
    # on the GPU machine, with .device (pack-tvm.sh runtime + setup-tvm.sh) and bench/.work/stage4-cuda/bundle carried:
    source .device/setup-tvm.sh; pip install -q --no-deps --no-build-isolation -e .; python3 bench/stage4_cuda.py measure --out $OUT
    python bench/stage4_cuda.py report RESULTS.json          # here: the table again
    # kept as bench/results/stage4-cuda-<date>.json, it is the GPU section of bench/RESULTS.md

Weights are random (speed does not depend on their values; the GPU machine has no model registry):
slimgraph's artifacts get random weights of their shapes on the device, torch gets a randomly
initialised LlamaForCausalLM of SmolLM2's config. Same work for all: a 128-token prompt, 128 greedy
tokens with end-of-sequence ignored; decode tokens/s counts tokens 2..128 (median of 3 runs after
two warm-ups, CUDA synchronised around each run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORK = Path(__file__).resolve().parent / ".work" / "stage4-cuda"
BUILDS = {"slimgraph-fp16": {}, "slimgraph-int4": {"quantize": "int4", "group_size": 128}}
CONTEXT, PROMPT, NEW, REPEATS = 1024, 128, 128, 3


def prepare() -> None:
    from cuda_bundle import pack

    from slimgraph.compiler.driver import CompileOptions, compile_model
    from slimgraph.compiler.recipe import recipe_from_flags
    from slimgraph.models.registry import resolve_model

    built = {}
    for name, flags in BUILDS.items():
        out = WORK / "artifacts" / name
        if not out.exists():
            compile_model("smollm2", out, CompileOptions(target="cuda", arch="sm_90", fp16=True, kv_cache=CONTEXT,
                                                         recipe=recipe_from_flags(**flags)))
        built[name] = (out, "random")
    summary = pack(built, WORK / "bundle")
    (WORK / "bundle" / "config.json").write_text((Path(resolve_model("smollm2").path) / "config.json").read_text())
    print(json.dumps(summary, indent=1))


def _stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def _timed(run_once):
    """run_once() -> seconds of decoding tokens 2..NEW."""
    run_once(), run_once()
    return _stats([(NEW - 1) / run_once() for _ in range(REPEATS)])


def measure_slimgraph(path: Path, ids: list[int]) -> dict:
    import slimgraph
    from slimgraph.backends.generation import TextGenerator
    from slimgraph.backends.sampling import SamplingOptions

    gen = TextGenerator(slimgraph.load(path, verify_hashes=False))   # token ids in: no tokenizer files travel
    options = SamplingOptions(max_new_tokens=NEW)

    def once():
        start = time.perf_counter()
        for _ in gen.stream(ids, options):
            pass
        return time.perf_counter() - start - gen.stats.first_token_seconds

    return {"decode_tokens_per_s": _timed(once)}


def measure_torch(config: dict, ids: list[int], compiled: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to("cuda", torch.float16).eval()
    prompt = torch.tensor([ids], device="cuda")
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
    if compiled:      # generate compiles the forward itself over a static cache (CUDA graphs included)
        from transformers import CompileConfig

        kwargs.update(cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead"))

    def run(new):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    result = {"decode_tokens_per_s": _timed(lambda: run(NEW) - run(1))}
    if compiled and getattr(model, "_compiled_call", None) is None:
        raise RuntimeError("generate did not compile the forward pass (it ran eagerly)")
    return result


def measure(out: Path) -> None:
    import numpy as np
    import torch
    from cuda_bundle import unpack

    bundle = WORK / "bundle"
    config = json.loads((bundle / "config.json").read_text())
    ids = [int(i) for i in np.random.default_rng(0).integers(0, config["vocab_size"], PROMPT)]
    artifacts = unpack(bundle, bundle, Path(tempfile.mkdtemp(prefix="stage4-cuda-")))   # weights stay out of $OUT
    rows = {}
    for name, (path, _) in sorted(artifacts.items()):
        rows[name] = _guarded(lambda: measure_slimgraph(path, ids))
        print(name, rows[name], flush=True)
    for name, compiled in (("torch-eager-fp16", False), ("torch-compile-fp16", True)):
        rows[name] = _guarded(lambda: measure_torch(config, ids, compiled))
        print(name, rows[name], flush=True)
    data = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "prompt_tokens": PROMPT, "new_tokens": NEW, "rows": rows}
    (out / "stage4-cuda.json").write_text(json.dumps(data, indent=1))
    report(out / "stage4-cuda.json")


def _guarded(fn) -> dict:
    try:
        return fn()
    except Exception as exc:  # a failing row is reported, not dropped
        return {"not_run": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}


def report(path: Path) -> None:
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    print(f"{data['gpu']}, torch {data['torch']}, {data['date']}: decode tokens/s (median, min-max)")
    for name, row in rows.items():
        s = row.get("decode_tokens_per_s")
        print(f"  {name:22s} " + (f"{s['median']:8.1f} ({s['min']:.1f}-{s['max']:.1f})" if s else row["not_run"]))
    base = rows.get("torch-compile-fp16", {}).get("decode_tokens_per_s")
    for name, target in (("slimgraph-fp16", 1.0), ("slimgraph-int4", 1.5)):
        ours = rows.get(name, {}).get("decode_tokens_per_s")
        if ours and base:
            ratio = ours["median"] / base["median"]
            print(f"  {name} / torch.compile fp16 = {ratio:.2f}x (target >= {target}: {'met' if ratio >= target else 'not met'})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["prepare", "measure", "report"])
    parser.add_argument("path", nargs="?")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
    elif args.command == "measure":
        measure(args.out)
    else:
        report(Path(args.path))


if __name__ == "__main__":
    main()

"""Stage-3 GPU benchmark: slimgraph's CUDA artifacts (built on the CPU machine) against PyTorch eager
and torch.compile on the GPU machine, in one run there.

Three steps, each a subcommand::

    python bench/stage3_cuda.py prepare            # here: build artifacts + references, pack .device/
    python bench/stage3_cuda.py measure --parts /tmp/sgpool --out $OUT   # GPU machine, one run
    python bench/stage3_cuda.py report RUN.json [RUN.log ...]   # here: tables + bench/results/stage3-cuda-<date>.json

Measured there, all at batch 1, median of ``--repeats`` CUDA-event timings after warm-up:

* correctness: SmolLM2-135M and all-MiniLM-L6-v2 artifacts (fp32 and ``--fp16``, real weights
  rebuilt bit-exactly from the carried pool, file hashes verified) against torch fp32 outputs
  computed here on the CPU; tiny test models (fp32, fp16, int4) against the reference interpreter;
* latency of one forward pass at T=128 and T=1 for SmolLM2: slimgraph fp32, fp16 and int4 (group
  128, float16 compute; static-shape artifacts, CUDA graphs) against transformers' LlamaForCausalLM
  with the same config (no KV cache) in eager and ``torch.compile`` (default mode), fp32 and fp16;
* bandwidth: a TinyLlama-1.1B-shaped int4 model (random weights), T=1 step, effective bytes of
  weights read per second against the device-to-device copy bandwidth measured in the same run
  (bytes read + bytes written by ``torch.Tensor.copy_`` of 2 GiB).
Speed-only artifacts get random weights of the right shapes there (their speed does not depend on
the values). ``prepare`` reuses an artifact under bench/.work/cuda/artifacts built by the same
slimgraph version with the same options: delete that folder to rebuild after changing the compiler.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORK = Path(__file__).resolve().parent / ".work" / "cuda"
CARRY = Path(__file__).resolve().parents[1] / ".device"
ARCH = "sm_90"
ARTIFACTS = {
    # name: model, weights policy (exact: real weights, carried; random: speed only), build options
    "smollm2-fp32": dict(model="smollm2", weights="exact"),
    "smollm2-fp16": dict(model="smollm2", weights="exact", fp16=True),
    "minilm-fp32": dict(model="minilm", weights="exact"),
    "minilm-fp16": dict(model="minilm", weights="exact", fp16=True),
    "tiny-llama-fp32": dict(model="tiny-llama", weights="exact"),
    "tiny-llama-fp16": dict(model="tiny-llama", weights="exact", fp16=True),
    "tiny-llama-int4": dict(model="tiny-llama", weights="exact", fp16=True, quantize="int4", group=32),
    # one-token static builds: the decoding kernels (matrix-vector products) of the speed runs
    "tiny-llama-fp16-T1": dict(model="tiny-llama", weights="exact", fp16=True, shape=(1, 1)),
    "tiny-llama-int4-T1": dict(model="tiny-llama", weights="exact", fp16=True, quantize="int4", group=32,
                               shape=(1, 1)),
    "tiny-gpt-fp32": dict(model="tiny-gpt", weights="exact"),
    "tiny-bert-fp32": dict(model="tiny-bert", weights="exact"),
    **{f"smollm2-{p}-T{t}": dict(model="smollm2", weights="random", shape=(1, t), **opts)
       for t in (128, 1) for p, opts in (("fp32", {}), ("fp16", {"fp16": True}),
                                         ("int4", {"fp16": True, "quantize": "int4"}))},
    "tinyllama-int4-T1": dict(model="tinyllama", weights="random", fp16=True, quantize="int4", shape=(1, 1),
                              bandwidth=True),
    "tinyllama-fp16-T1": dict(model="tinyllama", weights="random", fp16=True, shape=(1, 1), bandwidth=True),
}
CORRECTNESS = {  # artifact -> (reference, minimum cosine)
    "smollm2-fp32": ("smollm2", 0.9999), "smollm2-fp16": ("smollm2", 0.999),
    "minilm-fp32": ("minilm", 0.9999), "minilm-fp16": ("minilm", 0.999),
    **{f"{m}@{t}": (f"{m.rsplit('-', 1)[0]}@{t}", c) for m, c in (
        ("tiny-llama-fp32", 0.9999), ("tiny-llama-fp16", 0.999),
        ("tiny-gpt-fp32", 0.9999), ("tiny-bert-fp32", 0.9999)) for t in (1, 7)},
    **{f"tiny-llama-int4@{t}": (f"tiny-llama-int4@{t}", 0.999) for t in (1, 7)},
    "tiny-llama-fp16-T1@1": ("tiny-llama@1", 0.999), "tiny-llama-int4-T1@1": ("tiny-llama-int4-T1@1", 0.999),
    # speed-only int4 one-token builds against their own final IR on the same (random) weights, the
    # reference computed on the GPU machine (``own_ir_references``): the kernels of the real shapes
    **{f"{m}-int4-T1@1": (f"{m}-int4-T1@ir", 0.999) for m in ("smollm2", "tinyllama")},
}
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


# ----------------------------------------------------------------------------- prepare (CPU machine)
def _compile(model, name: str, *, fp16=False, shape=None, quantize=None, group=128):
    from slimgraph.compiler.driver import CompileOptions, compile_model
    from slimgraph.compiler.recipe import recipe_from_flags

    recipe = recipe_from_flags(quantize=quantize, group_size=group) if quantize else None
    shapes = {"input_ids": shape} if shape else {}
    out = WORK / "artifacts" / name
    if _same_build(out, fp16, shapes, recipe):
        print(f"reusing {name}", flush=True)
        return out
    print(f"compiling {name}", flush=True)
    return compile_model(str(model), out, CompileOptions(target="cuda", arch=ARCH, fp16=fp16, shapes=shapes,
                                                         recipe=recipe, force=True))


def _same_build(out: Path, fp16: bool, shapes: dict, recipe) -> bool:
    """Whether ``out`` holds an artifact built by this slimgraph with these options."""
    import slimgraph

    if not (out / "manifest.json").is_file():
        return False
    manifest = json.loads((out / "manifest.json").read_text())
    options = manifest["options"]
    return (manifest["slimgraph_version"] == slimgraph.__version__ and manifest["target"]["gpu_arch"] == ARCH
            and options.get("fp16") == fp16 and options["shapes"] == {k: list(v) for k, v in shapes.items()}
            and manifest["recipe"] == (recipe.to_dict() if recipe is not None else None))


def _tinyllama_folder() -> Path:
    folder = WORK / "tinyllama-1.1b-random"
    if not (folder / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA, use_cache=False, attn_implementation="sdpa"))
        model.config.architectures = ["LlamaForCausalLM"]
        model.save_pretrained(folder, safe_serialization=True)
    return folder


def _torch_references(references: dict) -> None:
    """torch fp32 (CPU) outputs of the real models for fixed token ids."""
    import torch

    from slimgraph.models.registry import reference_torch_model

    rng = np.random.default_rng(0)
    for name, length in (("smollm2", 16), ("minilm", 12)):
        model, _ = reference_torch_model(name)
        ids = rng.integers(0, 30000, (1, length)).astype(np.int64)
        feed = {"input_ids": ids} if name == "smollm2" else {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        references[name] = {"inputs": feed, "output": out.numpy()}


def _interpreter_references(references: dict) -> None:
    from slimgraph.backends.artifact import artifact_module
    from slimgraph.compiler import interpreter
    from slimgraph.compiler.driver import load_model
    from slimgraph.compiler.passmanager import make_sample_inputs

    for name in ("tiny-llama", "tiny-gpt", "tiny-bert"):
        module = load_model(name)[0]
        for length in (1, 7):
            inputs = make_sample_inputs(module, seed=length, symbol_value=length)
            references[f"{name}@{length}"] = {"inputs": inputs, "output": interpreter.run(module, inputs)[0]}
    # the int4 build against its own final IR (same packed weights): kernel correctness, not int4 error
    for name, lengths in (("tiny-llama-int4", (1, 7)), ("tiny-llama-int4-T1", (1,))):
        if not (WORK / "artifacts" / name / "graph.ir").is_file():
            continue
        quantized = artifact_module(WORK / "artifacts" / name)
        for length in lengths:
            inputs = references[f"tiny-llama@{length}"]["inputs"]
            references[f"{name}@{length}"] = {"inputs": inputs, "output": interpreter.run(quantized, inputs)[0]}


def _gathered_extent(module, fn, value: str) -> int | None:
    """The length of the gathered axis if every use of ``value`` in ``fn`` is the table of a gather
    (``take``'s first input), followed through layout ops (transpose, reshape) and into the fused
    functions it is passed to; None if some use reads it otherwise."""
    from slimgraph.compiler import ops

    types, extents = fn.value_types(module), []
    for node in fn.nodes:
        for i in (i for i, ref in enumerate(node.inputs) if ref == value):
            callee = module.functions.get(node.callee) if node.callee else None
            if node.op is ops.TAKE and i == 0:
                extents.append(types[value].shape[node.attr("axis")])
            elif node.op in (ops.TRANSPOSE, ops.RESHAPE):
                extents.append(_gathered_extent(module, fn, node.name))
            elif callee is not None:
                extents.append(_gathered_extent(module, callee, callee.params[i].name))
            else:
                return None
    return None if not extents or None in extents else min(extents)


def _weights_read_per_step(artifact: Path, tokens: int) -> int:
    """Bytes of weights one forward pass of ``tokens`` tokens reads: every weight once, except
    tables read only by gathers (token embeddings, also inside fused functions), of which only
    ``tokens`` entries of the gathered axis are read."""
    from slimgraph.compiler.printer import parse_module
    from slimgraph.compiler.weights_io import read_safetensors

    module = parse_module((artifact / "graph.ir").read_text())
    total = 0
    for name, array in read_safetensors(artifact / "weights.safetensors").items():
        extents = [_gathered_extent(module, fn, "@" + name) for fn in module.entries if name in fn.weight_refs()]
        gathered = extents and None not in extents
        total += array.nbytes * tokens // min(extents) if gathered else array.nbytes
    return int(total)


def _save_references(path: Path, references: dict) -> None:
    flat = {}
    for ref, data in references.items():
        flat[f"{ref}|out"] = data["output"]
        flat.update({f"{ref}|in|{k}": v for k, v in data["inputs"].items()})
    np.savez(path, **flat)


def load_references(path: Path) -> dict:
    refs: dict = {}
    with np.load(path) as data:
        for key in data.files:
            ref, kind, *name = key.split("|")
            entry = refs.setdefault(ref, {"inputs": {}})
            if kind == "out":
                entry["output"] = data[key]
            else:
                entry["inputs"][name[0]] = data[key]
    return refs


def prepare(args) -> None:
    from cuda_bundle import pack

    from slimgraph.models.registry import resolve_model

    built, meta = {}, {}
    for name, spec in ARTIFACTS.items():
        if (args.skip_tinyllama and spec["model"] == "tinyllama") or not _chosen(name, args.artifacts):
            continue
        model = _tinyllama_folder() if spec["model"] == "tinyllama" else spec["model"]
        built[name] = (_compile(model, name, fp16=spec.get("fp16", False), shape=spec.get("shape"),
                                quantize=spec.get("quantize"), group=spec.get("group", 128)), spec["weights"])
        if spec.get("bandwidth"):
            meta[name] = {"weight_bytes_read": _weights_read_per_step(built[name][0], 1)}
    references: dict = {}
    _torch_references(references)
    _interpreter_references(references)
    bundle = CARRY / "bundle"
    summary = pack(built, bundle)
    _save_references(bundle / "references.npz", references)
    (bundle / "meta.json").write_text(json.dumps({"artifacts": meta, "smollm2_config": json.loads(
        (Path(resolve_model("smollm2").path) / "config.json").read_text()), "tinyllama_config": TINYLLAMA}))
    _split_parts(bundle, summary["pool_parts"])
    print(json.dumps(summary, indent=1))


def _chosen(name: str, patterns: str) -> bool:
    return any(fnmatch.fnmatch(name, p.strip()) for p in patterns.split(","))


def _split_parts(bundle: Path, parts: list[str]) -> None:
    """Each pool part into its own carry folder .device/part-NNN (one run each)."""
    import shutil

    for old in CARRY.glob("part-*"):
        shutil.rmtree(old)
    for part in parts:
        folder = CARRY / f"part-{part.rsplit('.', 1)[1]}"
        folder.mkdir()
        shutil.move(str(bundle / part), folder / part)


# ----------------------------------------------------------------------------- measure (GPU machine)
def cuda_timer(fn, *, warmup: int, repeats: int) -> dict:
    """Median and spread of fn() in ms, timed by CUDA events around each call."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    samples.sort()
    return {"median_ms": samples[len(samples) // 2], "min_ms": samples[0], "max_ms": samples[-1], "repeats": repeats}


def copy_bandwidth() -> dict:
    """Device-to-device copy of 2 GiB: (bytes read + bytes written) / time."""
    import torch

    src = torch.empty(1 << 29, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    timing = cuda_timer(lambda: dst.copy_(src), warmup=3, repeats=20)
    moved = 2 * src.numel() * src.element_size()
    return {"bytes_moved": moved, **timing, "tb_per_s": moved / timing["median_ms"] / 1e9}


def check_correctness(artifacts: dict, references: dict) -> list[dict]:
    import slimgraph
    from slimgraph.compiler.passmanager import compare_outputs

    rows = []
    for key, (ref_name, minimum) in CORRECTNESS.items():
        name = key.split("@")[0]
        if name not in artifacts:
            continue
        ref = references[ref_name]
        path, policy = artifacts[name]
        model = slimgraph.load(path, verify_hashes=policy == "exact")   # random weights were drawn here
        got = model(**ref["inputs"])[0]
        cmp = compare_outputs(ref["output"], got)
        rows.append({"artifact": name, "reference": ref_name, "cosine": cmp.cosine, "min_cosine": minimum,
                     "max_abs_err": float(np.abs(got - ref["output"]).max()),
                     "max_abs_ref": float(np.abs(ref["output"]).max()), "ok": bool(cmp.cosine >= minimum)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def own_ir_references(artifacts: dict) -> dict:
    """``NAME@ir`` for the speed-only artifacts that CORRECTNESS checks so: the reference interpreter
    run on the artifact's own final IR with the weights drawn here (no file to carry; the whole
    1.1B-parameter model in numpy takes seconds to a minute)."""
    from slimgraph.backends.artifact import artifact_module
    from slimgraph.compiler import interpreter
    from slimgraph.compiler.passmanager import make_sample_inputs

    references = {}
    for ref_name, _ in CORRECTNESS.values():
        name, _, kind = ref_name.partition("@")
        if kind != "ir" or name not in artifacts:
            continue
        module = artifact_module(artifacts[name][0])
        inputs = make_sample_inputs(module, seed=1, symbol_value=1)
        references[ref_name] = {"inputs": inputs, "output": interpreter.run(module, inputs)[0]}
    return references


def time_artifact(path: Path, tokens: int, repeats: int) -> dict:
    """One forward pass of a static-shape artifact, inputs already on the GPU (VM call + sync)."""
    import slimgraph

    model = slimgraph.load(path, verify_hashes=False)
    call = model.main.prepared(np.zeros((1, tokens), np.int64))
    return cuda_timer(lambda: (call(), model.device.sync()), warmup=5, repeats=repeats)


def time_torch(config: dict, tokens: int, dtype: str, compiled: bool, repeats: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**config)
    cfg.use_cache = False
    model = LlamaForCausalLM(cfg).to("cuda", getattr(torch, dtype)).eval()
    ids = torch.zeros((1, tokens), dtype=torch.long, device="cuda")
    fn = torch.compile(model) if compiled else model
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        timing = cuda_timer(lambda: fn(input_ids=ids, use_cache=False), warmup=5, repeats=repeats)
    timing["first_call_s"] = first
    del model, fn
    torch.cuda.empty_cache()
    return timing


def _isolated(args, *step: str, timeout: int = 300) -> dict:
    """Run one timing step in its own process (a CUDA fault there cannot end the whole run)."""
    import subprocess

    cmd = [sys.executable, __file__, "one", "--repeats", str(args.repeats), "--unpacked", args.unpacked,
           "--bundle", args.bundle, *step]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-3:]
        return {"error": " | ".join(tail)[-600:]}
    return json.loads(lines[-1])


def diagnose(path: Path, tokens: int) -> None:
    """Run an artifact once, kernel by kernel with a sync after each, printing every kernel's name
    and the first one whose outputs hold NaN (or the last one started, if one faults)."""
    import tvm

    import slimgraph

    model = slimgraph.load(path, verify_hashes=False)
    found = []

    def instrument(func, name, before_run, ret_value, *call_args):
        if before_run:
            print(f"kernel {name}", flush=True)
            return 0
        model.device.sync()
        for arg in call_args:
            if isinstance(arg, tvm.runtime.Tensor) and "float" in str(arg.dtype) and not found:
                if np.isnan(arg.numpy()).any():
                    found.append(name)
                    print(f"first NaN output: {name} shape {arg.shape}", flush=True)
        return 0

    model.vm.set_instrument(instrument)
    inputs = {n: np.ones([tokens if isinstance(d, str) else d for d in t.shape], t.dtype.numpy)
              for n, t in zip(model.main.input_names, model.main.input_types)}
    model(**inputs)
    print(json.dumps({"nan_kernel": found[0] if found else None}))


def kernel_profile(path: Path, tokens: int, top: int = 12) -> dict:
    """GPU time per kernel name over 10 forward passes (torch.profiler's CUPTI trace sees the
    kernels of any library in the process): where a step's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import slimgraph

    model = slimgraph.load(path, verify_hashes=False)
    call = model.main.prepared(np.zeros((1, tokens), np.int64))
    for _ in range(5):
        call()
    model.device.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        model.device.sync()
    totals: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(event.name, [0.0, 0])
            entry[0] += event.device_time / 10 / 1e3
            entry[1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {"kernel_ms_per_step": sum(v[0] for v in totals.values()), "kernels_per_step": sum(v[1] for v in totals.values()) / 10,
            "top": [{"kernel": k[:90], "ms": round(v[0], 4), "launches": v[1] // 10} for k, v in rows[:top]]}


def one(args) -> None:
    """A single step: ``one artifact NAME``, ``one torch TOKENS DTYPE eager|compile``, ``one diagnose NAME T``,
    ``one profile NAME``."""
    if args.what[0] == "diagnose":
        return diagnose(Path(args.unpacked) / args.what[1], int(args.what[2]))
    if args.what[0] == "profile":
        name = args.what[1]
        return print(json.dumps(kernel_profile(Path(args.unpacked) / name, ARTIFACTS[name]["shape"][1])))
    if args.what[0] == "artifact":
        name = args.what[1]
        print(json.dumps(time_artifact(Path(args.unpacked) / name, ARTIFACTS[name]["shape"][1], args.repeats)))
    else:
        meta = json.loads((Path(args.bundle) / "meta.json").read_text())
        tokens, dtype, mode = int(args.what[1]), args.what[2], args.what[3]
        print(json.dumps(time_torch(meta["smollm2_config"], tokens, dtype, mode == "compile", args.repeats)))


def measure(args) -> None:
    import torch

    from cuda_bundle import unpack

    from slimgraph.backends.cuda_runtime import ensure_cuda_runtime

    ensure_cuda_runtime()
    bundle = Path(args.bundle)
    meta = json.loads((bundle / "meta.json").read_text())
    artifacts = unpack(bundle, Path(args.parts), Path(args.unpacked), args.artifacts)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy": copy_bandwidth(),
              "correctness": [], "slimgraph": {}, "torch_runs": {}, "profiles": {}, "meta": meta["artifacts"]}
    print(json.dumps(result["copy"]), flush=True)
    out = Path(args.out) / "stage3-cuda.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(section: str, key: str, row: dict) -> None:
        """Keep a row and rewrite the result file (a run cut short keeps what it measured)."""
        result[section][key] = row
        print(section, key, json.dumps(row), flush=True)
        out.write_text(json.dumps(result, indent=1))

    speed = [name for name, spec in ARTIFACTS.items() if spec["weights"] == "random" and name in artifacts]
    for name in speed:
        record("slimgraph", name, _isolated(args, "artifact", name))
    for tokens in () if args.no_torch else (128, 1):
        for dtype in args.torch_dtypes.split(","):
            for mode in ("eager", "compile"):
                record("torch_runs", f"{mode}-{dtype}-T{tokens}", _isolated(args, "torch", str(tokens), dtype, mode))
    # in this process, after the isolated steps: a kernel fault here ends only what is left
    references = load_references(bundle / "references.npz") | own_ir_references(artifacts)
    result["correctness"] = check_correctness(artifacts, references)
    out.write_text(json.dumps(result, indent=1))
    for name in speed:
        if args.profile and _chosen(name, args.profile):
            record("profiles", name, _isolated(args, "profile", name))


# ----------------------------------------------------------------------------- report (here)
def merge_results(paths: list[str]) -> dict:
    """One result from several measure runs: their JSON files, and the correctness lines of logs of
    runs that stopped early (``measure.log``). Later files win for the same row."""
    merged: dict = {"correctness": {}, "slimgraph": {}, "torch_runs": {}, "profiles": {}, "meta": {}}
    for path in paths:
        text = Path(path).read_text()
        if path.endswith(".json"):
            data = json.loads(text)
            merged.update({k: data[k] for k in ("device", "torch", "copy") if k in data})
            rows = data.get("correctness", [])
            for key in ("slimgraph", "torch_runs", "profiles", "meta"):
                merged[key].update(data.get(key, {}))
        else:
            rows = [json.loads(ln) for ln in text.splitlines() if ln.startswith('{"artifact"')]
        merged["correctness"].update({(r["artifact"], r["reference"]): r for r in rows})
    current = {(key.split("@")[0], ref) for key, (ref, _) in CORRECTNESS.items()}
    merged["correctness"] = [row for key, row in merged["correctness"].items() if key in current]
    return merged


def _ms_of(row: dict) -> str:
    return f"{row['median_ms']:8.3f}" if "median_ms" in row else f"  failed: {row.get('error', '?')[:90]}"


def report(args) -> None:
    from common import write_results

    result = merge_results(args.results)
    print(f"device: {result['device']}  torch {result['torch']}  copy bandwidth "
          f"{result['copy']['tb_per_s']:.2f} TB/s (read + write)")
    for row in result["correctness"]:
        print(f"  {row['artifact']:18s} vs {row['reference']:18s} cosine {row['cosine']:.6f} "
              f"(>= {row['min_cosine']}) {'ok' if row['ok'] else 'FAIL'}")
    sg, tr = result["slimgraph"], result["torch_runs"]
    for tokens in (128, 1):
        print(f"\nSmolLM2-135M, T={tokens}, median ms")
        rows = [(k, v) for k, v in sg.items() if k.startswith("smollm2") and k.endswith(f"-T{tokens}")]
        rows += [(f"torch {k}", v) for k, v in tr.items() if k.endswith(f"-T{tokens}")]
        for label, row in rows:
            print(f"  {label:28s} {_ms_of(row)}")
        ours, theirs = sg.get(f"smollm2-fp16-T{tokens}", {}), tr.get(f"compile-float16-T{tokens}", {})
        if "median_ms" in ours and "median_ms" in theirs:
            print(f"  slimgraph fp16 / torch.compile fp16 = {ours['median_ms'] / theirs['median_ms']:.2f}x")
    for name, data in result["meta"].items():
        if "median_ms" in sg.get(name, {}):
            rate = data["weight_bytes_read"] / sg[name]["median_ms"] / 1e9
            print(f"\n{name}: {sg[name]['median_ms']:.3f} ms, {data['weight_bytes_read'] / 1e6:.1f} MB of weights -> "
                  f"{rate:.2f} TB/s = {100 * rate / result['copy']['tb_per_s']:.1f}% of copy bandwidth")
    for name, prof in result.get("profiles", {}).items():
        if "top" in prof:
            print(f"\n{name}: {prof['kernels_per_step']:.0f} kernels, {prof['kernel_ms_per_step']:.3f} ms of GPU time per step")
            for row in prof["top"][:6]:
                print(f"  {row['ms']:8.4f} ms  x{row['launches']:<3d} {row['kernel']}")
    print(f"\nwrote {write_results('stage3-cuda', result)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--skip-tinyllama", action="store_true", help="leave out the 1.1B-parameter bandwidth model")
    p.add_argument("--artifacts", default="*", help="only the artifacts matching these comma-separated patterns "
                   "(the speed-only and tiny ones need no pool parts: one device run)")
    m = sub.add_parser("measure")
    m.add_argument("--bundle", default=str(CARRY / "bundle"))
    m.add_argument("--parts", default="/tmp/sgpool")
    m.add_argument("--unpacked", default="/tmp/sg-artifacts")
    m.add_argument("--out", default=".")
    m.add_argument("--repeats", type=int, default=50)
    m.add_argument("--artifacts", default="*", help="only the artifacts matching this pattern")
    m.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows")
    m.add_argument("--profile", default="", help="GPU time per kernel of the speed-only artifacts matching these patterns")
    m.add_argument("--torch-dtypes", default="float16,float32", help="PyTorch rows: comma-separated dtypes")
    o = sub.add_parser("one")
    o.add_argument("what", nargs="+")
    o.add_argument("--bundle", default=str(CARRY / "bundle"))
    o.add_argument("--unpacked", default="/tmp/sg-artifacts")
    o.add_argument("--repeats", type=int, default=50)
    r = sub.add_parser("report")
    r.add_argument("results", nargs="+", help="stage3-cuda.json / measure.log files of measure runs")
    args = parser.parse_args()
    {"prepare": prepare, "measure": measure, "one": one, "report": report}[args.step](args)


if __name__ == "__main__":
    main()

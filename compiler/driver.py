"""The compile driver: model -> slimgraph IR -> passes -> Relax -> TVM build -> artifact directory.

Each stage reports progress through ``on_event(kind, payload)`` (the CLI draws rich progress bars
from it) and its wall time into ``report.json``. Backends are reached only through
``slimgraph.backends``, which is the one package that imports TVM.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable


from slimgraph import __version__
from slimgraph.compiler.ir import Module
from slimgraph.compiler.kv_cache import GENERATION_METADATA
from slimgraph.compiler.printer import print_module
from slimgraph.compiler.specialize import bind_from_shapes, specialize
from slimgraph.compiler.verifier import verify
from slimgraph.compiler.weights_io import hash_file_into

if TYPE_CHECKING:
    from slimgraph.compiler.recipe import Recipe

EventFn = Callable[[str, dict], None]


def _quiet(kind: str, payload: dict) -> None:
    return None


@dataclass
class CompileOptions:
    target: str = "x86"
    mcpu: str | None = None              # CPU model (x86, arm64)
    arch: str | None = None              # GPU architecture (cuda: sm_90); None: the GPU present
    fp16: bool = False                   # compute in float16 (GPU targets)
    passes: tuple | None = None          # None: the default pipeline
    shapes: dict = field(default_factory=dict)
    dump_ir: Path | None = None
    print_after: tuple = ()
    verify: bool = False
    schedule: bool = True
    force: bool = False
    recipe: "Recipe | None" = None        # compression steps (slimgraph.compiler.recipe)
    tuning_db: Path | None = None         # apply the schedules tuned into this directory (slimgraph tune)
    kv_cache: int | None = None           # causal LMs: prefill + decode over a KV cache of this many positions


def model_hash(model_path: str | None) -> str | None:
    """sha256 over the model file, or over every file of a model folder (sorted by name)."""
    if model_path is None or not Path(model_path).exists():
        return None
    path = Path(model_path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for file in files:
        h.update(file.relative_to(path if path.is_dir() else path.parent).as_posix().encode())
        hash_file_into(h, file)
    return h.hexdigest()


def load_model(model, *, max_context: int | None = None, on_event: EventFn = _quiet) -> tuple[Module, str | None]:
    """Resolve a model (short name, path, Module) into IR; returns (module, path of its files).
    ``max_context``: import a causal LM for generation (prefill + decode over a KV cache)."""
    if isinstance(model, Module):
        return model, None
    from slimgraph.models.registry import load_source, resolve_model

    source = resolve_model(str(model))
    path = getattr(source, "path", None)
    on_event("stage_start", {"stage": "load", "detail": str(model)})
    key = (str(model), max_context, _files_state(path))
    if _LOADED.get("key") != key or key[2] is None:
        module = load_source(source, max_context=max_context)
        verify(module, source=str(model))
        _LOADED.update(key=key, module=module)
    module = _LOADED["module"]
    on_event("stage_end", {"stage": "load", "nodes": module.num_nodes()})
    return module, path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def copy_tokenizer(model_path, artifact: Path) -> str | None:
    """Copy the model folder's tokenizer files into ``artifact/tokenizer``; its folder name or None."""
    if model_path is None or not Path(model_path).is_dir():
        return None
    found = [Path(model_path) / name for name in TOKENIZER_FILES if (Path(model_path) / name).is_file()]
    if not any(f.name.startswith("tokenizer") or f.name == "vocab.json" for f in found):
        return None
    folder = artifact / "tokenizer"
    folder.mkdir()
    for file in found:
        shutil.copyfile(file, folder / file.name)
    return folder.name


_LOADED: dict = {}
"""The most recently loaded model: a sweep compiles one model many times in one process, and
tracing it through torch.export dominates a compile. Modules are immutable, so sharing is safe."""


def _files_state(path) -> tuple | None:
    """(name, size, mtime) of every file of a model path: changes whenever the files do."""
    if path is None or not Path(path).exists():
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def optimize(module: Module, options: CompileOptions, *, model_path: str | None = None,
             on_event: EventFn = _quiet):
    """Specialize shapes, then run the pass pipeline (with the recipe's compression steps, which
    calibrate on data tokenized with the model's own tokenizer); returns the PipelineReport."""
    from slimgraph.compiler.passmanager import DEFAULT_PIPELINE, run_pipeline

    if options.shapes and GENERATION_METADATA in module.metadata:
        from slimgraph.compiler.errors import UsageError

        raise UsageError("--shape cannot be combined with --kv-cache: prefill takes prompts of any length "
                         "and decode one token")
    if options.shapes:
        module = specialize(module, bind_from_shapes(module, options.shapes))
        verify(module, source="specialized module")
    passes = list(options.passes or DEFAULT_PIPELINE)
    if options.recipe is not None and not options.recipe.empty:
        passes = _compression_pipeline(module, options, model_path)
    if options.fp16 and "half_precision" not in passes:
        passes.insert(passes.index("fuse") if "fuse" in passes else len(passes), "half_precision")
    if "fuse" in passes:
        at = passes.index("fuse")
        passes[at:at] = _target_graph_passes(options)
    return run_pipeline(
        module, passes, verify=options.verify,
        print_after=set(options.print_after), dump_dir=options.dump_ir, on_event=on_event,
    )


def _target_graph_passes(options: CompileOptions) -> list:
    """The target's own IR passes (weight layouts of its kernels), run just before fusion."""
    from slimgraph.backends.targets import family_of, resolve_target

    spec = resolve_target(options.target, options.mcpu, gpu_arch=options.arch, fp16=options.fp16)
    return family_of(spec).graph_passes(spec)


def _compression_pipeline(module: Module, options: CompileOptions, model_path: str | None) -> list:
    from slimgraph.compiler.calibration import load_batches
    from slimgraph.compiler.errors import UsageError
    from slimgraph.passes._compress import CompressionContext
    from slimgraph.passes.compression import compression_pipeline

    if options.passes:
        raise UsageError("--passes cannot be combined with compression options; the compression steps "
                         "run between the cleanup passes and fusion")
    spec = options.recipe.calibration
    context = CompressionContext(options.recipe, lambda: load_batches(spec, module, model_path),
                                 explicit=spec.path is not None)
    return compression_pipeline(context)


def tune_model(model, db: str | Path, options: CompileOptions, *, trials: int, rpc_tracker: str | None = None,
               rpc_key: str | None = None, on_event: EventFn = _quiet, cost_model: str = "xgb") -> dict:
    """Tune the kernels ``compile`` would build for ``model`` into the database ``db``."""
    from slimgraph.backends.relax_lowering import lower_to_relax
    from slimgraph.backends.targets import resolve_target
    from slimgraph.backends.tuning import check_tracker, tune_module

    spec = resolve_target(options.target, options.mcpu, gpu_arch=options.arch, fp16=options.fp16)
    if rpc_tracker is not None:
        check_tracker(rpc_tracker)                 # fail before any work
    module, model_path = load_model(model, max_context=options.kv_cache, on_event=on_event)
    pipeline = optimize(module, options, model_path=model_path, on_event=on_event)
    lowered = lower_to_relax(pipeline.module)
    return tune_module(lowered.ir_module, spec, db, trials, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                       on_event=on_event, cost_model=cost_model)


def compile_model(model, output: str | Path, options: CompileOptions | None = None, *,
                  on_event: EventFn = _quiet) -> Path:
    """Compile ``model`` for ``options.target`` into the artifact directory ``output``."""
    from slimgraph.backends.artifact import ArtifactWriter, REPORT, seal_manifest, write_json
    from slimgraph.backends.compile import build_artifact_files

    from slimgraph.backends.targets import resolve_target

    options = options or CompileOptions()
    resolve_target(options.target, options.mcpu, gpu_arch=options.arch, fp16=options.fp16)  # fail before any work
    model_name = None if isinstance(model, Module) else str(model)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    writer = ArtifactWriter(output, force=options.force)  # refuse an existing output before any work
    module, model_path = load_model(model, max_context=options.kv_cache, on_event=on_event)
    timings["load"] = time.perf_counter() - start
    weight_bytes_before = module.weight_bytes()
    with writer as tmp:
        t0 = time.perf_counter()
        pipeline = optimize(module, options, model_path=model_path, on_event=on_event)
        timings["passes"] = time.perf_counter() - t0
        if options.dump_ir is not None:
            shutil.copytree(options.dump_ir, tmp / "ir")
        (tmp / "graph.ir").write_text(print_module(pipeline.module))
        build = build_artifact_files(pipeline.module, tmp, options, on_event=on_event)
        tokenizer = copy_tokenizer(model_path, tmp) if GENERATION_METADATA in pipeline.module.metadata else None
        timings.update(build.timings)
        timings["total"] = time.perf_counter() - start
        report = {
            "model": model_name or "<module>",
            "passes": [asdict(record) for record in pipeline.records],
            "nodes": {"input": module.num_nodes(), "output": pipeline.module.num_nodes()},
            "kernels": {"input": module.num_kernels(), "output": pipeline.module.num_kernels(),
                        "relax_functions": build.num_functions},
            "weight_bytes": {"input": weight_bytes_before, "output": pipeline.module.weight_bytes(),
                             "stored": (tmp / "weights.safetensors").stat().st_size,
                             "sparse_stored": build.sparse_weights},
            "compile_seconds": {k: round(v, 3) for k, v in timings.items()},
            "tuning": build.tuning,
        }
        write_json(tmp / REPORT, report)
        seal_manifest(tmp, {
            "slimgraph_version": __version__,
            "tvm_version": build.tvm_version,
            "target": build.target.to_dict(),
            "input_model": {"name": model_name,
                            "sha256": model_hash(model_path)},
            "pipeline": list(options.passes or [r.name for r in pipeline.records]),
            "recipe": options.recipe.to_dict() if options.recipe is not None else None,
            "options": {"shapes": {k: list(v) for k, v in options.shapes.items()}, "verify": options.verify,
                        "schedule": options.schedule, "mcpu": options.mcpu, "arch": options.arch, "fp16": options.fp16,
                        "tuning_db": str(options.tuning_db) if options.tuning_db else None, "dump_ir": options.dump_ir is not None,
                        "kv_cache": options.kv_cache},
            "entries": build.entries,
            GENERATION_METADATA: pipeline.module.metadata.get(GENERATION_METADATA),
            "tokenizer": tokenizer,
        })
    on_event("done", {"output": str(writer.out), "seconds": timings["total"]})
    return writer.out

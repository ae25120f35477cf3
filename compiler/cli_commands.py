"""Bodies of the CLI commands (kept apart from argument parsing in cli.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from slimgraph.compiler.errors import BadInputError, RuntimeInputError
from slimgraph.compiler.ir import FunctionKind


class RichProgress:
    """Draws a progress line per stage/pass from the driver's events (nothing with --json)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     TimeElapsedColumn(), transient=False)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, kind: str, payload: dict) -> None:
        if self.progress is None:
            return
        if kind in ("stage_start", "pass_start"):
            key = payload.get("stage") or payload.get("pass")
            label = payload.get("detail") or ""
            self.tasks[key] = self.progress.add_task(f"{kind.split('_')[0]} {key} {label}".strip(), total=1)
        elif kind in ("stage_end", "pass_end"):
            key = payload.get("stage") or payload.get("pass")
            if key in self.tasks:
                self.progress.update(self.tasks[key], completed=1)
        elif kind == "print_after":
            self.progress.console.print(payload.get("text", ""), highlight=False, markup=False, soft_wrap=True)


def run_compile(*, model, output, target, mcpu, passes, shape, dump_ir, print_after, verify, schedule, force,
                as_json, compression=None):
    from slimgraph.compiler.driver import CompileOptions, compile_model
    from slimgraph.compiler.recipe import recipe_from_flags
    from slimgraph.compiler.specialize import parse_shape_specs

    options = CompileOptions(
        target=target, mcpu=mcpu, passes=tuple(p.strip() for p in passes.split(",")) if passes else None,
        shapes=parse_shape_specs(shape), dump_ir=dump_ir, print_after=tuple(print_after), verify=verify,
        schedule=schedule, force=force, recipe=recipe_from_flags(**(compression or {})),
    )
    if options.passes:
        from slimgraph.compiler.passmanager import get_pass

        for name in options.passes:
            get_pass(name)
    with RichProgress(not as_json) as progress:
        out = compile_model(model, output, options, on_event=progress)
    report = json.loads((out / "report.json").read_text())
    if as_json:
        print(json.dumps({"ok": True, "artifact": str(out), "report": report}))
    else:
        secs = report["compile_seconds"]["total"]
        print(f"wrote {out} in {secs:.1f} s: {report['nodes']['input']} -> {report['nodes']['output']} nodes, "
              f"{report['kernels']['output']} kernels, {report['weight_bytes']['output'] / 1e6:.1f} MB of weights")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BadInputError(f"{path}: not a readable .npz file ({exc})") from None


def run_artifact(*, artifact, inputs, output, entry, as_json):
    import slimgraph

    model = slimgraph.load(artifact)
    fn = model[entry] if entry else model.main
    arrays = _load_npz(inputs)
    positional = all(k.startswith("arr_") for k in arrays)  # np.savez(path, a, b) names them arr_0, arr_1
    if not positional and set(arrays) != set(fn.input_names):
        raise RuntimeInputError(f"{inputs}: arrays {sorted(arrays)} do not match the inputs {fn.input_names}")
    outs = fn(*arrays.values()) if positional else fn(**arrays)
    named = dict(zip(fn.output_names, outs))
    if output:
        np.savez(output, **named)
    summary = {name: {"shape": list(a.shape), "dtype": str(a.dtype), "mean": float(np.mean(a)) if a.size else 0.0,
                      "max_abs": float(np.max(np.abs(a))) if a.size else 0.0} for name, a in named.items()}
    if as_json:
        print(json.dumps({"ok": True, "outputs": summary, "written": str(output) if output else None}))
    else:
        for name, info in summary.items():
            print(f"{name}: {info['dtype']}{info['shape']} mean={info['mean']:.6g} max|x|={info['max_abs']:.6g}")


def model_summary(module) -> dict:
    ops_count = Counter(n.op.name for f in module.entries for n in f.nodes)
    fused = [f for f in module.functions.values() if f.kind is FunctionKind.FUSED]
    params = sum(int(np.prod(w.type.shape, dtype=np.int64)) for w in module.weights.values())
    return {
        "inputs": {p.name: str(p.type) for p in module.main.params},
        "outputs": [str(t) for t in module.main.output_types()],
        "nodes": module.num_nodes(),
        "kernels": module.num_kernels(),
        "fused_functions": len(fused),
        "ops": dict(sorted(ops_count.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": params,
        "weight_bytes": module.weight_bytes(),
    }


def _inspect_artifact(path: Path) -> tuple[dict, object]:
    from slimgraph.backends.artifact import open_artifact
    from slimgraph.compiler.printer import parse_module

    info = open_artifact(path)
    report = json.loads((path / "report.json").read_text())
    module = parse_module((path / "graph.ir").read_text(), source=str(path / "graph.ir"))
    summary = {"artifact": str(path), "target": info.manifest["target"], "entries": info.manifest["entries"],
               "files": {k: (path / k).stat().st_size for k in info.manifest["files"]},
               "report": report, "graph": model_summary(module)}
    return summary, module


def run_inspect(*, target, optimize, html, as_json):
    path = Path(target)
    if (path / "manifest.json").is_file():
        summary, module = _inspect_artifact(path)
    else:
        from slimgraph.compiler.driver import load_model

        module, _ = load_model(target)
        if optimize:
            from slimgraph.compiler.passmanager import run_pipeline

            module = run_pipeline(module).module
        summary = {"model": target, "graph": model_summary(module)}
    if html:
        from slimgraph.compiler.visualize import write_html

        write_html(module, html, title=str(target))
        summary["html"] = str(html)
    if as_json:
        print(json.dumps({"ok": True, **summary}))
    else:
        _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    graph = summary["graph"]
    console.print(f"[bold]{summary.get('model') or summary.get('artifact')}[/]")
    console.print(f"inputs: {graph['inputs']}  outputs: {graph['outputs']}")
    console.print(f"nodes {graph['nodes']}, kernels {graph['kernels']}, fused functions {graph['fused_functions']}, "
                  f"parameters {graph['parameters']:,}, weights {graph['weight_bytes'] / 1e6:.2f} MB")
    table = Table("op", "count")
    for op, count in graph["ops"].items():
        table.add_row(op, str(count))
    console.print(table)
    if "html" in summary:
        console.print(f"wrote {summary['html']}")


def _artifact_for(target: str, workdir: Path) -> Path:
    """An artifact directory as given, or the model compiled (untuned, default passes) into workdir."""
    if (Path(target) / "manifest.json").is_file():
        return Path(target)
    from slimgraph.compiler.driver import CompileOptions, compile_model

    return compile_model(target, workdir / "artifact", CompileOptions())


def open_for_eval(path):
    """Load an artifact for evaluation: (loaded model, its model's name, the folder with its tokenizer)."""
    import slimgraph
    from slimgraph.compiler.errors import UsageError
    from slimgraph.models.registry import resolve_model

    model = slimgraph.load(path)
    name = model.manifest["input_model"]["name"]
    folder = resolve_model(name).path if name else None
    if folder is None or not (Path(folder) / "tokenizer_config.json").is_file():
        raise UsageError(f"{path}: model {name!r} has no tokenizer to turn text into tokens")
    return model, name, folder


def artifact_perplexity(path, text=None, window: int = 512, max_tokens: int | None = None):
    """Perplexity of a compiled causal-LM artifact on ``text`` (default: the fixed Wikipedia evaluation
    slice), tokenized with its model's tokenizer, as ``slimgraph eval --metric ppl`` measures it;
    returns (PerplexityResult, summary dict)."""
    from slimgraph.compiler.evaluation import perplexity

    model, name, folder = open_for_eval(path)
    result = perplexity(lambda batch: model(input_ids=batch)[0], _tokens(folder, text, max_tokens), window=window)
    return result, {"model": name, "artifact": str(path), "text": str(text or "wikipedia eval slice"),
                    **result.to_dict()}


def run_eval(*, target, metric, text, window, max_tokens, as_json, max_sentences=256):
    import tempfile

    from slimgraph.compiler.errors import UsageError

    if metric not in EVALUATORS:
        raise UsageError(f"unknown --metric {metric!r}; available: {', '.join(EVALUATORS)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = _artifact_for(target, Path(tmp))
        model, name, folder = open_for_eval(path)
        result, line = EVALUATORS[metric](model, path, name, folder, text=text, window=window,
                                          max_tokens=max_tokens, max_sentences=max_sentences)
    summary = {"model": name, "artifact": str(target), "text": str(text or "wikipedia eval slice"), **result}
    if as_json:
        print(json.dumps({"ok": True, **summary}))
    else:
        print(line)


def _eval_perplexity(model, path, name, folder, *, text, window, max_tokens, **_) -> tuple[dict, str]:
    from slimgraph.compiler.evaluation import perplexity

    ids = _tokens(folder, text, max_tokens)
    result = perplexity(lambda batch: model(input_ids=batch)[0], ids, window=window)
    return result.to_dict(), (f"perplexity {result.perplexity:.4f} over {result.predicted_tokens} predicted tokens "
                              f"({result.windows} windows of {window})")


def _eval_embedding(model, path, name, folder, *, text, max_sentences, **_) -> tuple[dict, str]:
    """Cosine of the artifact's mean-pooled sentence embeddings to the fp32 transformers model's."""
    import torch
    from transformers import AutoTokenizer

    from slimgraph.compiler.errors import UnknownModelError, UsageError
    from slimgraph.compiler.evaluation import embedding_fidelity, sentence_batches
    from slimgraph.models.registry import reference_torch_model

    inputs = model.main.input_names
    if not {"input_ids", "attention_mask"} <= set(inputs) or len(model.main.output_names) != 1:
        raise UsageError(f"{path}: --metric embedding needs a sentence encoder taking input_ids and attention_mask "
                         f"and returning hidden states; this artifact takes {inputs}")
    try:
        reference, _ = reference_torch_model(name)
    except UnknownModelError as err:
        raise UsageError(f"{path}: no fp32 reference for model {name!r}: {err.message}") from None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batches = sentence_batches(_eval_text(text), lambda s: tokenizer(s)["input_ids"], max_sentences=max_sentences)
    if not batches:
        raise UsageError(f"{path}: no sentence of 8..128 tokens in {text or 'the wikipedia eval slice'}")

    def compiled(batch):
        ids = batch["input_ids"]
        feeds = {**batch, "token_type_ids": np.zeros_like(ids)}
        hidden = model(**{k: feeds[k] for k in inputs if k in feeds})[0]
        if hidden.ndim != 3 or hidden.shape[:2] != ids.shape:
            raise UsageError(f"{path}: output {hidden.dtype}{list(hidden.shape)} for input_ids {list(ids.shape)} "
                             f"is not a last hidden state [B, T, H]; --metric embedding needs an encoder")
        return hidden

    def fp32(batch):
        with torch.no_grad():
            return reference(**{k: torch.from_numpy(v) for k, v in batch.items()}).numpy()

    result = embedding_fidelity(compiled, fp32, batches)
    return result.to_dict(), (f"embedding cosine vs fp32 over {result.sentences} sentences: mean {result.mean_cosine:.6f} "
                              f"(1 - mean = {1 - result.mean_cosine:.2e}), min {result.min_cosine:.6f}, "
                              f"p05 {result.p05_cosine:.6f}")


EVALUATORS = {"ppl": _eval_perplexity, "embedding": _eval_embedding}


def _eval_text(text) -> str:
    from slimgraph.models.wiki_text import wiki_split

    source = Path(text) if text else wiki_split().evaluation
    if not source.is_file():
        raise BadInputError(f"{source}: no such text file")
    return source.read_text(encoding="utf-8")


def _tokens(folder, text, max_tokens) -> np.ndarray:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = np.asarray(tokenizer(_eval_text(text))["input_ids"], np.int64)
    return ids[:max_tokens] if max_tokens else ids



def run_sweep_command(*, sweep_file, output, as_json):
    from rich.console import Console

    from slimgraph.compiler.sweep import load_sweep, run_sweep
    from slimgraph.compiler.sweep_report import OUTPUTS, rich_table

    console = Console()
    document = run_sweep(load_sweep(sweep_file), output, on_event=_sweep_progress(None if as_json else console),
                         command=f"slimgraph sweep {sweep_file} -o {output}")
    files = {kind: str(Path(output) / name) for kind, name in OUTPUTS.items()}
    if as_json:
        print(json.dumps({"ok": True, "files": files, **document}))
    else:
        console.print(rich_table(document))
        console.print("wrote " + ", ".join(files.values()), highlight=False)


def _sweep_progress(console):
    """One line per sweep step: the configuration, whether its artifact / result is reused (console None: quiet)."""
    from rich.markup import escape

    lines = {"config_start": lambda p: f"[bold]\\[{p['index']}/{p['total']}] {escape(p['name'])}[/]",
             "compile": lambda p: f"  {'reusing' if p['reused'] else 'compiling'} {escape(p['artifact'])}",
             "evaluate": lambda p: f"  {'cached perplexity' if p['cached'] else 'measuring perplexity'}",
             "config_failed": lambda p: f"  [red]failed[/] {escape(p['error'])}"}

    def show(kind: str, payload: dict) -> None:
        if console is not None and kind in lines:
            console.print(lines[kind](payload), highlight=False)

    return show

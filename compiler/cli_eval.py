"""Bodies of the measuring CLI commands: ``eval`` (perplexity, embedding fidelity) and ``sweep``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slimgraph.compiler.errors import BadInputError


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
    result = perplexity(lambda batch: model(input_ids=batch)[0], text_tokens(folder, text, max_tokens), window=window)
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

    ids = text_tokens(folder, text, max_tokens)
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


def text_tokens(folder, text, max_tokens) -> np.ndarray:
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

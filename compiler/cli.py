"""The ``slimgraph`` command line: compile, run, inspect.

Exit codes are stable per error class: 0 ok, 2 usage, 3 bad input, 4 unsupported, 5 internal.
With ``--json`` every command prints one JSON document (errors too) and no progress bars.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from slimgraph.compiler.errors import EXIT_CODES, InternalError, SlimgraphError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="slimgraph: compress and compile models through Apache TVM.")


def _emit_error(err: SlimgraphError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": err.to_dict()}))
    else:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error[/] {err}", highlight=False, markup=True)


def _guarded(json_errors: bool, fn, *args, **kwargs):
    """Run a command body, turning every failure into a message and a stable exit code."""
    try:
        return fn(*args, **kwargs)
    except SlimgraphError as err:
        _emit_error(err, json_errors)
        raise typer.Exit(err.exit_code)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # a bug: report it as internal, never as a raw traceback
        err = InternalError(f"unexpected {type(exc).__name__}: {exc}",
                            hint="this is a slimgraph bug; rerun with SLIMGRAPH_DEBUG=1 for the traceback")
        import os

        if os.environ.get("SLIMGRAPH_DEBUG"):
            raise
        _emit_error(err, json_errors)
        raise typer.Exit(err.exit_code)


@app.command("compile")
def compile_cmd(
    model: str = typer.Argument(..., help="short name (smollm2, minilm, mlp, ...), HF folder, .onnx file"),
    output: Path = typer.Option(..., "-o", "--output", help="artifact directory to write"),
    target: str = typer.Option("x86", "--target", help="compilation target: x86, arm64, cuda"),
    mcpu: Optional[str] = typer.Option(None, "--mcpu", help="CPU model: znver4, cortex-a76, ... (x86 default: this machine's)"),
    arch: Optional[str] = typer.Option(None, "--arch", help="GPU architecture for cuda, e.g. sm_90 (default: this machine's GPU)"),
    fp16: bool = typer.Option(False, "--fp16", help="compute in float16 (GPU targets)"),
    passes: Optional[str] = typer.Option(None, "--passes", help="comma-separated pass list"),
    shape: List[str] = typer.Option([], "--shape", help="fix an input shape, e.g. input_ids=1x128"),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="write one numbered IR file per pass"),
    print_after: List[str] = typer.Option([], "--print-after", help="print the IR after this pass"),
    verify: bool = typer.Option(False, "--verify", help="check the graph numerically after every pass"),
    no_schedule: bool = typer.Option(False, "--no-schedule", help="build without slimgraph's CPU schedules"),
    force: bool = typer.Option(False, "--force", help="replace an existing output directory"),
    tuning_db: Optional[Path] = typer.Option(None, "--tuning-db", help="apply the schedules `slimgraph tune` recorded here"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="compression recipe (TOML) with per-layer rules"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="weight quantization: int8, int4, int3"),
    group_size: int = typer.Option(128, "--group-size", help="rows per quantization group (0: per channel)"),
    method: str = typer.Option("rtn", "--method", help="quantizer: rtn, gptq, awq"),
    symmetric: bool = typer.Option(False, "--symmetric", help="symmetric quantization (no zero points)"),
    quantize_activations: Optional[str] = typer.Option(
        None, "--quantize-activations", help="int8: round quantized matmuls' inputs to 8-bit codes per block of 32 "
        "at run time (integer dot products on CPUs with AVX-512 VNNI)"),
    prune: Optional[float] = typer.Option(None, "--prune", help="unstructured sparsity, e.g. 0.5"),
    prune_method: str = typer.Option("magnitude", "--prune-method", help="magnitude, wanda, sparsegpt"),
    prune_n_m: Optional[str] = typer.Option(None, "--prune-n-m", help="N:M sparsity, e.g. 2:4"),
    prune_ffn: Optional[float] = typer.Option(None, "--prune-ffn", help="fraction of FFN neurons to remove"),
    lowrank: Optional[float] = typer.Option(None, "--lowrank", help="fraction of linear-layer parameters to remove"),
    lowrank_method: str = typer.Option("svd", "--lowrank-method", help="svd, asvd, whiten"),
    lowrank_energy: Optional[float] = typer.Option(None, "--lowrank-energy", help="keep this spectral energy instead"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text file or .npz inputs"),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="calibration windows (default 16)"),
    calib_seq_len: Optional[int] = typer.Option(None, "--calib-seq-len", help="tokens per window (default 512)"),
    kv_cache: Optional[int] = typer.Option(None, "--kv-cache", help="causal LMs: build prefill + decode over a "
                                           "key/value cache of this many positions (for `slimgraph generate`)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Compile MODEL for a target into an artifact directory."""
    from slimgraph.compiler.cli_commands import run_compile

    compression = dict(recipe_file=recipe, quantize=quantize, group_size=group_size, method=method,
                       symmetric=symmetric, prune=prune, prune_method=prune_method, prune_n_m=prune_n_m,
                       prune_ffn=prune_ffn, lowrank=lowrank, lowrank_method=lowrank_method,
                       lowrank_energy=lowrank_energy, calib=calib, calib_samples=calib_samples,
                       calib_seq_len=calib_seq_len, activations=quantize_activations)
    _guarded(as_json, run_compile, model=model, output=output, target=target, mcpu=mcpu, arch=arch, fp16=fp16,
             passes=passes,
             shape=shape, dump_ir=dump_ir, print_after=print_after, verify=verify, schedule=not no_schedule,
             force=force, as_json=as_json, compression=compression, tuning_db=tuning_db, kv_cache=kv_cache)


@app.command("tune")
def tune_cmd(
    model: str = typer.Argument(..., help="short name, HF folder or .onnx file, as for compile"),
    db: Path = typer.Option(..., "--db", help="tuning database directory (one sub-folder per target)"),
    trials: int = typer.Option(64, "--trials", help="measured schedules per kernel"),
    target: str = typer.Option("x86", "--target", help="compilation target: x86, arm64, cuda"),
    mcpu: Optional[str] = typer.Option(None, "--mcpu", help="CPU model (x86 default: this machine's)"),
    arch: Optional[str] = typer.Option(None, "--arch", help="GPU architecture for cuda, e.g. sm_90"),
    fp16: bool = typer.Option(False, "--fp16", help="compute in float16 (GPU targets)"),
    shape: List[str] = typer.Option([], "--shape", help="fix an input shape, e.g. input_ids=1x128"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="compression recipe (TOML)"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="weight quantization: int8, int4, int3"),
    group_size: int = typer.Option(128, "--group-size", help="rows per quantization group (0: per channel)"),
    method: str = typer.Option("rtn", "--method", help="quantizer: rtn, gptq, awq"),
    symmetric: bool = typer.Option(False, "--symmetric", help="symmetric quantization"),
    quantize_activations: Optional[str] = typer.Option(None, "--quantize-activations",
                                                       help="int8: 8-bit matmul inputs, as for compile"),
    rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", help="measure on devices of this TVM RPC tracker, HOST:PORT"),
    rpc_key: Optional[str] = typer.Option(None, "--rpc-key", help="device key the RPC servers registered with"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Tune MODEL's kernels for a target with MetaSchedule into a database that compile --tuning-db applies."""
    from slimgraph.compiler.cli_commands import run_tune

    compression = dict(recipe_file=recipe, quantize=quantize, group_size=group_size, method=method,
                       symmetric=symmetric, activations=quantize_activations)
    _guarded(as_json, run_tune, model=model, db=db, trials=trials, target=target, mcpu=mcpu, arch=arch, fp16=fp16,
             shape=shape, compression=compression, rpc_tracker=rpc_tracker, rpc_key=rpc_key, as_json=as_json)


@app.command("run")
def run_cmd(
    artifact: Path = typer.Argument(..., help="compiled artifact directory"),
    inputs: Path = typer.Option(..., "--inputs", help=".npz file with one array per input name"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write outputs to this .npz"),
    entry: Optional[str] = typer.Option(None, "--entry", help="entry function (default: the first)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Run a compiled artifact on inputs from an .npz file."""
    from slimgraph.compiler.cli_commands import run_artifact

    _guarded(as_json, run_artifact, artifact=artifact, inputs=inputs, output=output, entry=entry, as_json=as_json)


@app.command("inspect")
def inspect_cmd(
    target: str = typer.Argument(..., help="model (name, folder, .onnx) or compiled artifact directory"),
    optimize: bool = typer.Option(False, "--optimize", help="show the model after the default pass pipeline"),
    html: Optional[Path] = typer.Option(None, "--html", help="write a self-contained picture of the graph"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Show ops, parameters and sizes of a model or an artifact."""
    from slimgraph.compiler.cli_commands import run_inspect

    _guarded(as_json, run_inspect, target=target, optimize=optimize, html=html, as_json=as_json)


@app.command("eval")
def eval_cmd(
    target: str = typer.Argument(..., help="compiled artifact directory, or a model to compile first"),
    metric: str = typer.Option("ppl", "--metric", help="ppl: perplexity of a causal LM; embedding: sentence-embedding "
                               "cosine of an encoder to its fp32 model"),
    text: Optional[Path] = typer.Option(None, "--text", help="text file (default: the fixed Wikipedia slice)"),
    window: int = typer.Option(512, "--window", help="tokens per evaluation window"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="evaluate only the first N tokens"),
    max_sentences: int = typer.Option(256, "--max-sentences", help="sentences compared by --metric embedding"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Measure a model with its compiled artifact (perplexity, or embedding cosine to the fp32 model)."""
    from slimgraph.compiler.cli_eval import run_eval

    _guarded(as_json, run_eval, target=target, metric=metric, text=text, window=window, max_tokens=max_tokens,
             max_sentences=max_sentences, as_json=as_json)


@app.command("generate")
def generate_cmd(
    artifact: Path = typer.Argument(..., help="artifact compiled with --kv-cache"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="text to continue (tokenized with the model's tokenizer)"),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="comma-separated token ids instead of text"),
    raw: bool = typer.Option(False, "--raw", help="no chat template, even where the model has one"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy"),
    top_k: int = typer.Option(0, "--top-k", help="sample among the k most likely tokens (0: all)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass (1: off)"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the sampler"),
    stop: List[int] = typer.Option([], "--stop", help="stop at this token id (repeatable; default: the EOS token)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: every CPU)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON document: text, token ids, timings"),
):
    """Generate text with a compiled causal LM, streaming tokens as they come."""
    from slimgraph.compiler.cli_generate import run_generate

    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, seed=seed)
    _guarded(as_json, run_generate, artifact=artifact, prompt=prompt, prompt_ids=prompt_ids, chat=not raw,
             sampling=sampling, stop=stop, threads=threads, as_json=as_json)


@app.command("sweep")
def sweep_cmd(
    sweep_file: Path = typer.Argument(..., help="sweep file (TOML): model, eval settings, one config table each"),
    output: Path = typer.Option(..., "-o", "--output", help="directory for artifacts, cached results and the table"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Compile and evaluate a grid of compression settings: size / perplexity table (JSON, markdown) and plot."""
    from slimgraph.compiler.cli_eval import run_sweep_command

    _guarded(as_json, run_sweep_command, sweep_file=sweep_file, output=output, as_json=as_json)


def main(argv: list[str] | None = None) -> int:
    """Entry point. Usage errors detected by the argument parser exit with the usage code (2)."""
    try:
        app(args=argv, prog_name="slimgraph")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else EXIT_CODES["usage"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

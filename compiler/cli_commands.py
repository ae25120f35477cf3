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

    def _tune_line(self, p: dict) -> None:
        """One line per tuning task, updated after every measured batch."""
        key = f"tune:{p['task']}"
        text = (f"tune {p['task']}: {p['trials']} trials, current {_ms(p['current_s'])}, best {_ms(p['best_s'])}"
                f"{', ' + str(p['failed']) + ' failed' if p['failed'] else ''}, {p['elapsed_s']:.0f} s")
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(text, total=None)
        self.progress.update(self.tasks[key], description=text)

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
        elif kind == "tune_progress":
            self._tune_line(payload)
        elif kind == "tune_task_end" and payload.get("skipped"):
            self.progress.console.print(f"  {payload['task']}: {payload['records_before']} records, {payload['skipped']}")
        elif kind == "warning":
            self.progress.console.print(f"[yellow]warning[/] {payload['text']}", highlight=False)
        elif kind == "print_after":
            self.progress.console.print(payload.get("text", ""), highlight=False, markup=False, soft_wrap=True)


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f} ms"


def run_tune(*, model, db, trials, target, mcpu, arch, fp16, shape, compression, rpc_tracker, rpc_key, as_json):
    from slimgraph.compiler.driver import CompileOptions, tune_model
    from slimgraph.compiler.recipe import recipe_from_flags
    from slimgraph.compiler.specialize import parse_shape_specs

    options = CompileOptions(target=target, mcpu=mcpu, arch=arch, fp16=fp16, shapes=parse_shape_specs(shape),
                             recipe=recipe_from_flags(**compression))
    with RichProgress(not as_json) as progress:
        result = tune_model(model, db, options, trials=trials, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                            on_event=progress)
    if as_json:
        print(json.dumps({"ok": True, **result}))
        return
    print(f"{len(result['tasks'])} kernels, {result['measured']} schedules measured, records in {result['database']}")
    for row in result["tasks"]:
        print(f"  {row['task']:48s} best {_ms(row['best_s']):>12s}  default {_ms(row.get('default_s')):>12s}  "
              f"({row['records_before']} -> {row['records_before'] + row['measured']} records)")


def run_compile(*, model, output, target, mcpu, arch=None, fp16=False, passes, shape, dump_ir, print_after, verify, schedule, force,
                as_json, compression=None, tuning_db=None, kv_cache=None):
    from slimgraph.compiler.driver import CompileOptions, compile_model
    from slimgraph.compiler.recipe import recipe_from_flags
    from slimgraph.compiler.specialize import parse_shape_specs

    options = CompileOptions(
        target=target, mcpu=mcpu, arch=arch, fp16=fp16, passes=tuple(p.strip() for p in passes.split(",")) if passes else None,
        shapes=parse_shape_specs(shape), dump_ir=dump_ir, print_after=tuple(print_after), verify=verify,
        schedule=schedule, force=force, recipe=recipe_from_flags(**(compression or {})), tuning_db=tuning_db,
        kv_cache=kv_cache,
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
        tuning = report.get("tuning")
        if tuning and "warning" not in tuning:
            print(f"tuning database {tuning['database']}: {len(tuning['matched'])} kernels tuned, "
                  f"{len(tuning['kept_default'])} kept their default schedule (faster than the tuned one), "
                  f"{len(tuning['fallback'])} untuned on default schedules ({', '.join(tuning['fallback'][:8])}"
                  f"{' ...' if len(tuning['fallback']) > 8 else ''})")
            if tuning["default_not_measured"]:
                print(f"{len(tuning['default_not_measured'])} kernels have records but no time for today's default "
                      f"schedule and keep it: run `slimgraph tune` on this database to measure it")


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

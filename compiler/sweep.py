"""Compression sweeps: one model, a grid of compression settings, one table of size against quality.

A sweep file (TOML)::

    model = "smollm2"          # short name or path, as for `slimgraph compile`
    window = 512               # perplexity window in tokens, as `slimgraph eval --window`
    max_tokens = 0             # evaluate the first N tokens; 0 = the whole fixed evaluation slice
    metric = "ppl"             # the only metric so far
    [[config]]
    name = "int4 g128 GPTQ"
    quantize = "int4"          # every other key is a keyword of recipe_from_flags (the compile flags);
    method = "gptq"            # recipe_file / calib paths are relative to the sweep file

The uncompressed baseline is always measured first. Each configuration is compiled into
``OUT/artifacts/<slug>`` and measured with that artifact. Sweeps resume: an artifact whose manifest
names the same model (and model hash) and recipe is reused, and ``OUT/results/<slug>.json`` keeps
the measurement keyed by (model, recipe, metric, window, max_tokens, sha256 of the weights), so a
rerun measures only what changed. Per row, with P the parameter count of the baseline's weights::

    bits_per_param = 8 * weight_bytes / P
    size_ratio     = weight_bytes / baseline weight_bytes
    delta          = ppl - baseline ppl          delta_pct = 100 * delta / baseline ppl

Outputs: ``sweep.json`` (machine, versions, settings, rows), ``sweep.md`` (table by size, baseline
first) and ``sweep.png`` (perplexity against weight size with the Pareto front; see sweep_report).
Progress goes to ``on_event(kind, payload)`` with kinds config_start, compile (payload "reused"),
evaluate ("cached"), config_failed and done; the library never prints. ``evaluate`` replaces the
perplexity measurement (as `slimgraph eval` does it), e.g. for test models without a tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import typing
from pathlib import Path
from typing import Callable

from slimgraph.compiler.errors import ArtifactIntegrityError, CompressionOptionError, SlimgraphError
from slimgraph.compiler.recipe import Recipe, read_toml, recipe_from_flags

EventFn = Callable[[str, dict], None]
Evaluate = Callable[[Path, int, "int | None"], object]   # (artifact, window, max_tokens) -> PerplexityResult
BASELINE = "baseline"
METRICS = ("ppl",)
TOP_KEYS = ("model", "window", "max_tokens", "metric", "config")
FLAG_TYPES = {k: v for k, v in typing.get_type_hints(recipe_from_flags).items() if k != "return"}
PATH_KEYS = ("recipe_file", "calib")


def _quiet(kind: str, payload: dict) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    name: str
    slug: str             # directory / file name under OUT
    settings: dict        # recipe_from_flags keywords as given (paths resolved)
    recipe: Recipe


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    path: Path
    model: str
    window: int = 512
    max_tokens: int = 0
    metric: str = "ppl"
    configs: tuple = ()


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CompressionOptionError(message)


def slugify(name: str) -> str:
    """``int4 g128 GPTQ`` -> ``int4-g128-gptq``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "config"


def _fits(value, hint) -> bool:
    """Whether a TOML value has a type the keyword's annotation allows (ints pass for floats)."""
    allowed = {t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)}
    if float in allowed:
        allowed.add(int)
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, tuple(t for t in allowed if isinstance(t, type)))


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and check a sweep file; every configuration's recipe is built (and checked) now."""
    path = Path(path)
    data = read_toml(path, "sweep file")
    unknown = sorted(set(data) - set(TOP_KEYS))
    _require(not unknown, f"{path}: unknown key(s) {unknown}; a sweep file has {', '.join(TOP_KEYS)}")
    _require(isinstance(data.get("model"), str) and bool(data["model"]), f'{path}: needs model = "name or path"')
    window, max_tokens, metric = data.get("window", 512), data.get("max_tokens", 0), data.get("metric", "ppl")
    _require(type(window) is int and window >= 2, f"{path}: window must be an integer >= 2, got {window!r}")
    _require(type(max_tokens) is int and max_tokens >= 0, f"{path}: max_tokens must be an integer >= 0 (0: all)")
    _require(metric in METRICS, f"{path}: unknown metric {metric!r}; available: {', '.join(METRICS)}")
    tables = data.get("config", [])
    _require(isinstance(tables, list) and all(isinstance(t, dict) for t in tables),
             f"{path}: configurations are [[config]] tables")
    configs = tuple(_config(table, i, path) for i, table in enumerate(tables))
    _check_unique(configs, path)
    return SweepSpec(path, data["model"], window, max_tokens, metric, configs)


def _config(table: dict, index: int, path: Path) -> SweepConfig:
    name = table.get("name")
    _require(isinstance(name, str) and bool(name.strip()), f'{path}: [[config]] number {index + 1} needs name = "..."')
    where = f"{path}: config {name!r}"
    settings = {k: v for k, v in table.items() if k != "name"}
    unknown = sorted(set(settings) - set(FLAG_TYPES))
    _require(not unknown, f"{where}: unknown key(s) {unknown}; allowed: name, {', '.join(FLAG_TYPES)}")
    for key, value in settings.items():
        _require(_fits(value, FLAG_TYPES[key]), f"{where}: {key} = {value!r} has the wrong type")
    for key in PATH_KEYS:
        if key in settings and not Path(settings[key]).is_absolute():
            settings[key] = str(path.parent / settings[key])
    try:
        recipe = recipe_from_flags(**settings)
    except CompressionOptionError as err:
        raise CompressionOptionError(f"{where}: {err.message}", hint=err.hint) from None
    _require(not recipe.empty, f"{where} compresses nothing (set quantize, prune, prune_n_m, prune_ffn or lowrank)")
    return SweepConfig(name, slugify(name), settings, recipe)


def _check_unique(configs: tuple, path: Path) -> None:
    slugs = [BASELINE]
    for config in configs:
        _require(config.slug not in slugs, f"{path}: config {config.name!r} has the same name (or file name "
                                           f"{config.slug!r}) as another config or the baseline")
        slugs.append(config.slug)


def run_sweep(spec: SweepSpec, out: str | Path, *, on_event: EventFn = _quiet, evaluate: Evaluate | None = None,
              command: str | None = None) -> dict:
    """Measure the baseline and every configuration, write sweep.json / .md / .png into ``out`` and
    return the sweep document. A configuration that fails with a slimgraph error becomes a row with
    an ``error`` (the sweep goes on); a failing baseline stops the sweep."""
    from slimgraph.compiler import sweep_report

    out = Path(out)
    evaluate = evaluate or _artifact_ppl
    runs = [SweepConfig(BASELINE, BASELINE, {}, recipe_from_flags())] + list(spec.configs)
    measured = []
    for index, config in enumerate(runs):
        on_event("config_start", {"name": config.name, "index": index + 1, "total": len(runs)})
        try:
            measured.append(measure_config(spec, config, out, evaluate, on_event))
        except SlimgraphError as err:
            if config.slug == BASELINE:
                raise
            measured.append({"name": config.name, "settings": config.settings, "error": str(err)})
            on_event("config_failed", {"name": config.name, "error": str(err)})
    document = {"command": command or f"slimgraph sweep {spec.path} -o {out}", "date": sweep_report.now(),
                "machine": sweep_report.machine_info(out / "artifacts" / BASELINE), "model": spec.model,
                "eval": {"metric": spec.metric, "window": spec.window, "max_tokens": spec.max_tokens},
                "baseline_params": measured[0]["tensor_elements"], "rows": finish_rows(measured)}
    sweep_report.write_outputs(document, out)
    on_event("done", {"out": str(out)})
    return document


def _artifact_ppl(path: Path, window: int, max_tokens: int | None):
    from slimgraph.compiler.cli_eval import artifact_perplexity

    return artifact_perplexity(path, None, window, max_tokens)[0]


def measure_config(spec: SweepSpec, config: SweepConfig, out: Path, evaluate: Evaluate, on_event: EventFn) -> dict:
    """Compile (or reuse) one configuration's artifact and measure it (or reuse its cached result)."""
    artifact = out / "artifacts" / config.slug
    _ensure_artifact(spec.model, config, artifact, on_event)
    report = json.loads((artifact / "report.json").read_text())
    weight_bytes, params, weights_sha = weights_summary(artifact)
    key = {"model": spec.model, "recipe": _jsonable(config.recipe.to_dict()), "metric": spec.metric,
           "window": spec.window, "max_tokens": spec.max_tokens, "weights_sha256": weights_sha}
    cache = out / "results" / f"{config.slug}.json"
    result = _cached(cache, key)
    on_event("evaluate", {"name": config.name, "cached": result is not None})
    if result is None:
        result = _evaluate(cache, key, lambda: evaluate(artifact, spec.window, spec.max_tokens or None))
    return {"name": config.name, "settings": config.settings, "artifact": str(artifact.relative_to(out)),
            "perplexity": result["perplexity"], "predicted_tokens": result["predicted_tokens"],
            "weight_bytes": weight_bytes, "tensor_elements": params,
            "artifact_bytes": sum((artifact / name).stat().st_size for name in ("weights.safetensors", "model.so")),
            "compile_s": report["compile_seconds"]["total"], "eval_s": result["eval_s"],
            "compression": compression_totals(report)}


def _jsonable(value):
    return json.loads(json.dumps(value))


def _evaluate(cache: Path, key: dict, measure: Callable[[], object]) -> dict:
    """Run ``measure`` (-> PerplexityResult), timed, and store the result in ``cache`` under ``key``."""
    start = time.perf_counter()
    result = {**measure().to_dict(), "eval_s": round(time.perf_counter() - start, 2)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def _cached(path: Path, key: dict) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get("result") if isinstance(data, dict) and data.get("key") == key else None


def _ensure_artifact(model: str, config: SweepConfig, artifact: Path, on_event: EventFn) -> None:
    from slimgraph.compiler.driver import CompileOptions, compile_model

    reused = _reusable(artifact, model, config.recipe)
    on_event("compile", {"name": config.name, "artifact": str(artifact), "reused": reused})
    if not reused:
        compile_model(model, artifact, CompileOptions(recipe=config.recipe, force=True))


def _reusable(artifact: Path, model: str, recipe: Recipe) -> bool:
    """An intact artifact of the same model (name and file hash) compiled with the same recipe."""
    from slimgraph.backends.artifact import MANIFEST, open_artifact
    from slimgraph.compiler.driver import model_hash
    from slimgraph.models.registry import resolve_model

    if not (artifact / MANIFEST).is_file():
        return False
    try:
        manifest = open_artifact(artifact).manifest
    except ArtifactIntegrityError:
        return False
    source = {"name": model, "sha256": model_hash(resolve_model(model).path)}
    return manifest.get("input_model") == source and manifest.get("recipe") == _jsonable(recipe.to_dict())


def weights_summary(artifact: Path) -> tuple[int, int, str]:
    """(tensor bytes, parameters, sha256) of the artifact's weights file. The safetensors header is an
    8-byte little-endian length, then JSON {name: {dtype, shape, data_offsets: [start, end]}}."""
    from slimgraph.backends.artifact import MANIFEST, WEIGHTS

    with open(artifact / WEIGHTS, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    tensors = [t for name, t in header.items() if name != "__metadata__"]
    nbytes = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in tensors)
    params = sum(math.prod(t["shape"]) for t in tensors)
    return nbytes, params, json.loads((artifact / MANIFEST).read_text())["files"][WEIGHTS]


def compression_totals(report: dict) -> dict:
    """Per compression pass (those whose stats have per-layer rows): layers changed, parameters
    before/after, and the mean / min output SQNR (dB) over the layers that have one."""
    totals = {}
    for record in report["passes"]:
        stats = record["stats"]
        if "layers" not in stats:
            continue
        sqnr = [row["sqnr_db"] for row in stats["layers"] if row.get("sqnr_db") is not None]
        totals[record["name"]] = {
            "layers_changed": stats["layers_changed"], "params_before": stats["params_before"],
            "params_after": stats["params_after"], "sqnr_mean_db": round(sum(sqnr) / len(sqnr), 2) if sqnr else None,
            "sqnr_min_db": min(sqnr) if sqnr else None}
    return totals


def finish_rows(measured: list[dict]) -> list[dict]:
    """Add the columns relative to the baseline (measured[0]); a non-finite perplexity becomes an error."""
    base = measured[0]
    rows = []
    for row in measured:
        row = dict(row)
        if "error" not in row and not math.isfinite(row["perplexity"]):
            row["error"] = f"perplexity is {row['perplexity']}"
            row["perplexity"] = None
        if "error" not in row:
            delta = row["perplexity"] - base["perplexity"]
            row.update(delta=delta, delta_pct=100.0 * delta / base["perplexity"],
                       size_ratio=row["weight_bytes"] / base["weight_bytes"],
                       bits_per_param=8.0 * row["weight_bytes"] / base["tensor_elements"])
        rows.append(row)
    return rows

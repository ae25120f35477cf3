"""`slimgraph sweep`: the sweep file parser, the Pareto front, the table / plot writers, and a real
resumable sweep on tiny-llama (which has no tokenizer, so its perplexity is measured with the
compiled artifact on fixed random tokens through the ``evaluate`` hook)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import slimgraph
from slimgraph.compiler.errors import CompressionOptionError
from slimgraph.compiler.evaluation import PerplexityResult, perplexity
from slimgraph.compiler.sweep import finish_rows, load_sweep, run_sweep, slugify
from slimgraph.compiler.sweep_report import markdown, pareto_front, write_outputs

INT8 = 'name = "int8 per-channel RTN"\nquantize = "int8"\ngroup_size = 0\nsymmetric = true\n'


def sweep_file(tmp_path, text: str):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- parser
def test_parse_valid_file(tmp_path):
    path = sweep_file(tmp_path, f'model = "smollm2"\nwindow = 256\nmax_tokens = 1024\n[[config]]\n{INT8}'
                                '[[config]]\nname = "int4 g128 GPTQ"\nquantize = "int4"\nmethod = "gptq"\n'
                                '[[config]]\nname = "2:4 wanda"\nprune_n_m = "2:4"\nprune_method = "wanda"\n'
                                'calib = "calib.txt"\n')
    spec = load_sweep(path)
    assert (spec.model, spec.window, spec.max_tokens, spec.metric) == ("smollm2", 256, 1024, "ppl")
    assert [c.slug for c in spec.configs] == ["int8-per-channel-rtn", "int4-g128-gptq", "2-4-wanda"]
    int8, gptq, wanda = (c.recipe for c in spec.configs)
    assert int8.steps["quantize"].bits == 8 and int8.steps["quantize"].group_size is None
    assert int8.steps["quantize"].symmetric and int8.steps["quantize"].method == "rtn"
    assert gptq.steps["quantize"].method == "gptq" and gptq.steps["quantize"].group_size == 128  # flag default
    assert wanda.step_names() == ["prune"] and wanda.steps["prune"].n_m == (2, 4)
    assert wanda.calibration.path == str(tmp_path / "calib.txt")   # relative to the sweep file


def test_defaults(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, f'model = "tiny-llama"\n[[config]]\n{INT8}'))
    assert (spec.window, spec.max_tokens, spec.metric) == (512, 0, "ppl")


@pytest.mark.parametrize("text, words", [
    (f'model = "m"\n[[config]]\n{INT8}bits = 4\n', ["int8 per-channel RTN", "bits"]),
    ('window = 512\n', ["model"]),
    (f'model = "m"\nmodle = "x"\n[[config]]\n{INT8}', ["modle"]),
    ('model = "m"\n[[config]]\nname = "x"\nquantize = 4\n', ["'x'", "quantize"]),
    ('model = "m"\n[[config]]\nname = "x"\nprune = 1.5\n', ["'x'", "(0, 1)"]),
    ('model = "m"\n[[config]]\nname = "x"\nmethod = "gptq"\n', ["'x'", "compresses nothing"]),
    ('model = "m"\n[[config]]\nquantize = "int4"\n', ["needs name"]),
    (f'model = "m"\n[[config]]\n{INT8}[[config]]\n{INT8}', ["same name"]),
    ('model = "m"\n[[config]]\nname = "Baseline"\nquantize = "int4"\n', ["same name"]),
    ('model = "m"\nmetric = "bleu"\n', ["bleu"]),
    ('model = "m"\nwindow = 1\n', ["window"]),
    ('model = "m"\n[[config]\n', ["cannot read"]),
])
def test_bad_files_name_the_problem(tmp_path, text, words):
    with pytest.raises(CompressionOptionError) as info:
        load_sweep(sweep_file(tmp_path, text))
    for word in words:
        assert word in str(info.value)


def test_slugify():
    assert slugify("int4 g128 GPTQ") == "int4-g128-gptq"
    assert slugify("50% Wanda") == "50-wanda" and slugify("%%") == "config"


# ----------------------------------------------------------------------------- Pareto front
def test_pareto_front_hand_example():
    points = [(10, 5), (5, 6), (5, 7), (20, 4), (20, 5), (3, 100), (3, 100), (30, 4)]
    # (5,7) loses to (5,6); (20,5) to (10,5); (30,4) to (20,4); equal points do not dominate each other
    assert [points[i] for i in pareto_front(points)] == [(3, 100), (3, 100), (5, 6), (10, 5), (20, 4)]


def test_pareto_front_definition_on_random_points():
    rng = np.random.default_rng(0)
    points = [tuple(p) for p in rng.integers(0, 12, (60, 2)).tolist()]
    front = set(pareto_front(points))

    def beats(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    for i, p in enumerate(points):
        dominated = any(beats(q, p) for q in points)
        assert (i in front) == (not dominated)
        if dominated:   # every point off the front is beaten by a point on it
            assert any(beats(points[j], p) for j in front)


# ----------------------------------------------------------------------------- writers
PARAMS = 8000   # weight bytes = bits * 1000, exact for the bit widths below


def measured_rows(ppls: dict) -> list[dict]:
    """Rows as measure_config returns them, from {name: (bits per parameter, perplexity)}."""
    return [{"name": name, "settings": {}, "perplexity": ppl, "weight_bytes": int(bits * PARAMS / 8),
             "tensor_elements": PARAMS, "artifact_bytes": int(bits * PARAMS / 8) + 500, "compile_s": 1.0,
             "eval_s": 2.0} for name, (bits, ppl) in ppls.items()]


def synthetic_document(ppls: dict) -> dict:
    measured = measured_rows(ppls)
    measured.append({"name": "broken | config", "settings": {}, "error": "[SG-300] calibration failed"})
    return {"command": "slimgraph sweep s.toml -o out", "date": "2026-01-01T00:00:00+00:00",
            "machine": {"cpu": "test cpu", "cores": 2, "versions": {"slimgraph": "0.1.0"}}, "model": "m",
            "eval": {"metric": "ppl", "window": 512, "max_tokens": 0}, "baseline_params": PARAMS,
            "rows": finish_rows(measured)}


ROWS = {"baseline": (32, 10.0), "int8": (8.5, 10.1), "int4 rtn": (4.5, 12.0), "int4 gptq": (4.5, 11.0),
        "int3": (3.5, 30.0), "2:4": (18, 40.0)}


def table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")][2:]   # skip header + rule
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_rows_relative_to_the_baseline():
    rows = {r["name"]: r for r in synthetic_document(ROWS)["rows"]}
    assert rows["baseline"]["delta"] == 0 and rows["baseline"]["bits_per_param"] == 32
    assert math.isclose(rows["int4 gptq"]["delta_pct"], 10.0)
    assert math.isclose(rows["int8"]["size_ratio"], 8.5 / 32, rel_tol=1e-3)
    assert math.isclose(rows["int3"]["bits_per_param"], 3.5)
    base, int8 = measured_rows({"baseline": (32, 10.0), "int8": (8, float("nan"))})
    nan_row = finish_rows([base, int8])[1]
    assert nan_row["perplexity"] is None and "delta" not in nan_row and "nan" in nan_row["error"]


def test_markdown_sorted_by_size_with_front_marked():
    document = synthetic_document(ROWS)
    text = markdown(document)
    rows = table_rows(text)
    assert [r[1] for r in rows] == ["baseline", "int3", "int4 gptq", "int4 rtn", "int8", "2:4"]
    sizes = [float(r[2]) for r in rows[1:]]
    assert sizes == sorted(sizes)
    assert {r[1] for r in rows if r[0] == "★"} == {"baseline", "int3", "int4 gptq", "int8"}
    assert "`slimgraph sweep s.toml -o out`" in text and "broken / config: [SG-300]" not in text
    assert "- broken | config: [SG-300] calibration failed" in text


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_writers_produce_json_markdown_png(tmp_path):
    document = synthetic_document(ROWS)
    paths = write_outputs(document, tmp_path / "wide")
    assert json.loads(paths["json"].read_text()) == document
    assert paths["markdown"].read_text() == markdown(document)
    wide_w, wide_h = png_size(paths["plot"])
    narrow = synthetic_document({"baseline": (32, 10.0), "int8": (8.5, 10.1), "int4": (4.5, 11.0)})
    narrow_w, narrow_h = png_size(write_outputs(narrow, tmp_path / "narrow")["plot"])
    assert narrow_w >= 800 and narrow_h >= 600
    assert wide_w > 1.8 * narrow_w            # a wide perplexity range adds the zoomed panel


# ----------------------------------------------------------------------------- a real sweep
TOKENS = np.random.default_rng(1).integers(0, 256, 130)


class ArtifactPerplexity:
    """Perplexity measured with the compiled artifact on fixed random tokens; counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, path, window, max_tokens):
        self.calls.append(path.name)
        model = slimgraph.load(path)
        ids = TOKENS[:max_tokens] if max_tokens else TOKENS
        return perplexity(lambda batch: model(input_ids=batch)[0], ids, window=window)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    spec = load_sweep(sweep_file(root, f'model = "tiny-llama"\nwindow = 32\n[[config]]\n{INT8}'
                                       '[[config]]\nname = "int4 GPTQ"\nquantize = "int4"\nmethod = "gptq"\n'))
    evaluate, events = ArtifactPerplexity(), []
    document = run_sweep(spec, root / "out", evaluate=evaluate, on_event=lambda k, p: events.append((k, p)))
    return spec, root / "out", document, evaluate.calls, events


def torch_perplexity(window: int) -> float:
    from slimgraph.models.registry import reference_torch_model

    reference, _ = reference_torch_model("tiny-llama")

    def logits(batch):
        with torch.no_grad():
            return reference(input_ids=torch.from_numpy(batch)).numpy()

    return perplexity(logits, TOKENS, window=window).perplexity


def test_sweep_rows_measure_the_artifacts(tiny_sweep):
    spec, out, document, calls, _ = tiny_sweep
    base, int8, gptq = document["rows"]
    assert calls == ["baseline", "int8-per-channel-rtn"]
    assert math.isclose(base["perplexity"], torch_perplexity(spec.window), rel_tol=1e-4)
    assert base["delta"] == 0 and math.isclose(base["bits_per_param"], 32.0, rel_tol=1e-6)  # float32 weights
    assert 8 < int8["bits_per_param"] < 16 and int8["size_ratio"] < 0.5 and abs(int8["delta_pct"]) < 1.0
    assert int8["artifact_bytes"] > int8["weight_bytes"] > 0 and int8["compile_s"] > 0
    quantize = int8["compression"]["quantize"]
    assert quantize["layers_changed"] > 0 and quantize["params_before"] == quantize["params_after"]
    assert "no tokenizer" in gptq["error"] or "calibration" in gptq["error"]   # GPTQ needs calibration text
    assert (out / "artifacts" / "int8-per-channel-rtn" / "weights.safetensors").is_file()
    assert json.loads((out / "sweep.json").read_text())["rows"] == document["rows"]
    assert [r[1] for r in table_rows((out / "sweep.md").read_text())] == ["baseline", "int8 per-channel RTN"]
    assert png_size(out / "sweep.png")[0] > 0


def test_rerun_reuses_artifacts_and_results(tiny_sweep):
    spec, out, document, _, _ = tiny_sweep
    spec = dataclasses.replace(spec, configs=spec.configs[:1])
    evaluate, events = ArtifactPerplexity(), []
    again = run_sweep(spec, out, evaluate=evaluate, on_event=lambda k, p: events.append((k, p)))
    assert evaluate.calls == []
    assert [p["reused"] for k, p in events if k == "compile"] == [True, True]
    assert [r["perplexity"] for r in again["rows"]] == [r["perplexity"] for r in document["rows"][:2]]

    shorter = dataclasses.replace(spec, max_tokens=64)   # new eval settings: measure again, same artifacts
    evaluate = ArtifactPerplexity()
    rows = run_sweep(shorter, out, evaluate=evaluate)["rows"]
    assert evaluate.calls == ["baseline", "int8-per-channel-rtn"]
    assert rows[0]["predicted_tokens"] == 62


def test_changed_recipe_recompiles(tiny_sweep):
    spec, out, document, _, _ = tiny_sweep
    changed = load_sweep(sweep_file(out.parent, 'model = "tiny-llama"\nwindow = 32\n[[config]]\n'
                                                'name = "int8 per-channel RTN"\nquantize = "int8"\ngroup_size = 32\n'))
    # a stub measurement: this process already loaded the old model.so from the same path, and
    # loading a replaced library again under the same path would give the cached one
    stub = lambda path, window, max_tokens: PerplexityResult(2.0, math.log(2.0), 10, 1, window)  # noqa: E731
    events = []
    rows = run_sweep(changed, out, evaluate=stub, on_event=lambda k, p: events.append((k, p)))["rows"]
    assert [p["reused"] for k, p in events if k == "compile"] == [True, False]
    manifest = json.loads((out / "artifacts" / "int8-per-channel-rtn" / "manifest.json").read_text())
    assert manifest["recipe"]["steps"]["quantize"]["group_size"] == 32
    assert rows[1]["weight_bytes"] != document["rows"][1]["weight_bytes"]   # group scales cost bytes


def test_cli_reports_bad_sweep_file(tmp_path):
    path = sweep_file(tmp_path, f'model = "tiny-llama"\n[[config]]\n{INT8}bits = 4\n')
    proc = subprocess.run([sys.executable, "-m", "slimgraph.compiler.cli", "sweep", str(path), "-o",
                           str(tmp_path / "out"), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "SG-106" and re.search(r"int8 per-channel RTN.*bits", error["message"])
    assert not (tmp_path / "out").exists()

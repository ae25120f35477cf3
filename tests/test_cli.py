"""The command line: exit codes per error class, --json, no tracebacks, no partial outputs."""

import json
import subprocess
import sys

import numpy as np
import pytest

from slimgraph.compiler.printer import parse_module, print_module

pytest.importorskip("tvm")


def slimgraph(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "slimgraph.compiler.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    proc = slimgraph("compile", "mlp", "--target", "x86", "-o", root / "mlp", "--dump-ir", root / "ir1", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def test_compile_json_report(mlp_artifact):
    report = json.loads((mlp_artifact / "mlp" / "report.json").read_text())
    assert report["passes"] and report["nodes"]["input"] >= report["nodes"]["output"]
    assert (mlp_artifact / "mlp" / "ir").is_dir()


def test_dump_ir_is_deterministic_and_parses(mlp_artifact, tmp_path):
    proc = slimgraph("compile", "mlp", "-o", tmp_path / "again", "--dump-ir", tmp_path / "ir2", "--json")
    assert proc.returncode == 0, proc.stderr
    first = sorted((mlp_artifact / "ir1").iterdir())
    second = sorted((tmp_path / "ir2").iterdir())
    assert [p.name for p in first] == [p.name for p in second] and first[0].name.startswith("00-")
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
        assert print_module(parse_module(a.read_text())) == a.read_text()


def test_existing_output_is_a_usage_error(mlp_artifact):
    proc = slimgraph("compile", "mlp", "-o", mlp_artifact / "mlp")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = slimgraph("compile", "mlp", "-o", mlp_artifact / "mlp", "--force", "--json")
    assert proc.returncode == 0


def test_run_with_npz(mlp_artifact, tmp_path):
    import slimgraph as sg

    model = sg.load(mlp_artifact / "mlp")
    name = model.input_names[0]
    shape = [2 if isinstance(d, str) else d for d in model.main.input_types[0].shape]
    np.savez(tmp_path / "in.npz", **{name: np.ones(shape, np.float32)})
    proc = slimgraph("run", mlp_artifact / "mlp", "--inputs", tmp_path / "in.npz", "-o", tmp_path / "out.npz", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] and (tmp_path / "out.npz").is_file()
    np.savez(tmp_path / "bad.npz", **{name: np.ones(shape, np.float64)})
    proc = slimgraph("run", mlp_artifact / "mlp", "--inputs", tmp_path / "bad.npz", "--json")
    assert proc.returncode == 3 and "expected dtype f32" in json.loads(proc.stdout)["error"]["message"]


def test_tampered_artifact_exit_code(mlp_artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mlp_artifact / "mlp", copy)
    (copy / "model.so").write_bytes((copy / "model.so").read_bytes() + b"x")
    np.savez(tmp_path / "in.npz", x=np.ones((1, 1), np.float32))
    proc = slimgraph("run", copy, "--inputs", tmp_path / "in.npz")
    assert proc.returncode == 3 and "model.so" in proc.stderr and "sha256" in proc.stderr


def test_inspect_json_and_html(mlp_artifact, tmp_path):
    proc = slimgraph("inspect", "mlp", "--optimize", "--json", "--html", tmp_path / "g.html")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["graph"]["parameters"] > 0 and info["graph"]["ops"]
    page = (tmp_path / "g.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "fused" in page
    proc = slimgraph("inspect", mlp_artifact / "mlp", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["target"]["name"] == "x86"


def test_usage_errors(tmp_path):
    assert slimgraph("compile", "mlp", "-o", tmp_path / "x", "--passes", "bogus").returncode == 2
    assert slimgraph("compile", "mlp", "-o", tmp_path / "x", "--target", "sparc").returncode == 2
    assert slimgraph("compile", "mlp", "-o", tmp_path / "x", "--shape", "x=axb").returncode == 2
    assert slimgraph("compile", "no-such-model", "-o", tmp_path / "x").returncode in (2, 3)
    assert slimgraph("frobnicate").returncode == 2
    assert not (tmp_path / "x").exists()


def test_garbage_onnx_is_bad_input(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    proc = slimgraph("compile", bad, "-o", tmp_path / "out", "--json")
    assert proc.returncode == 3
    assert str(bad) in json.loads(proc.stdout)["error"]["message"]
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]


def test_html_renders_in_a_browser(tmp_path):
    """The --html page draws in headless Chromium (skipped where no Chromium is installed)."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine")
    page = tmp_path / "g.html"
    assert slimgraph("inspect", "tiny-llama", "--optimize", "--html", page).returncode == 0
    shot = tmp_path / "g.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
                    page.as_uri()], capture_output=True, timeout=120)
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000  # a drawn page, not a blank one


def test_eval_needs_a_tokenizer_and_a_known_metric(mlp_artifact):
    proc = slimgraph("eval", mlp_artifact / "mlp", "--json")
    assert proc.returncode == 2 and "no tokenizer" in json.loads(proc.stdout)["error"]["message"]
    proc = slimgraph("eval", mlp_artifact / "mlp", "--metric", "bleu", "--json")
    assert proc.returncode == 2 and "unknown --metric" in json.loads(proc.stdout)["error"]["message"]

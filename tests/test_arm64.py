"""ARM (aarch64) artifacts built here run under qemu-aarch64 and match the x86 artifacts' outputs.

The aarch64 userland (Debian's arm64 python3.11, aarch64 wheels of the TVM runtime and numpy) is
set up by ``slimgraph.backends.arm64_sysroot``; ``.ci/run`` installs the host tools (qemu-user,
gcc-aarch64-linux-gnu) and sets ``SLIMGRAPH_REQUIRE_ARM64=1`` so that CI fails instead of skipping
when they are missing. All artifacts of a test run in one qemu process (Python + TVM start in ~10 s
under emulation).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import slimgraph
from slimgraph.compiler.driver import CompileOptions, compile_model, load_model
from slimgraph.compiler.errors import TargetError
from slimgraph.compiler.passmanager import compare_outputs, make_sample_inputs
from slimgraph.compiler.recipe import recipe_from_flags

RUNNER = Path(__file__).with_name("arm64_run_artifacts.py")


@pytest.fixture(scope="module")
def userland():
    from slimgraph.backends import arm64_sysroot

    tools = ("qemu-aarch64", "aarch64-linux-gnu-gcc", "apt-get")
    if any(shutil.which(t) is None for t in tools) and not os.environ.get("SLIMGRAPH_REQUIRE_ARM64"):
        pytest.skip("qemu-user / gcc-aarch64-linux-gnu not installed (CI installs them)")
    return arm64_sysroot.ensure_userland()


def build_pair(model: str, tmp_path: Path, length: int, **options):
    """The model compiled for x86 and arm64, plus inputs of length T and the x86 outputs."""
    module = load_model(model)[0]
    inputs = make_sample_inputs(module, seed=3, symbol_value=length)
    x86 = compile_model(model, tmp_path / f"{model}-x86", CompileOptions(**options))
    arm = compile_model(model, tmp_path / f"{model}-arm64", CompileOptions(target="arm64", mcpu="cortex-a76", **options))
    np.savez(tmp_path / f"{model}-inputs.npz", **inputs)
    return arm, tmp_path / f"{model}-inputs.npz", slimgraph.load(x86)(**inputs)


def run_under_qemu(land, jobs, cpu=None):
    """jobs: (artifact, inputs.npz, outputs.npz); returns per job the outputs or the error dict."""
    from slimgraph.backends.arm64_sysroot import run_python

    args = [str(p) for job in jobs for p in job]
    result = run_python(land, RUNNER, *args, cpu=cpu)
    assert result.returncode == 0, result.stderr[-3000:]
    found = []
    for _, _, out in jobs:
        error = Path(f"{out}.json")
        if error.is_file():
            found.append(json.loads(error.read_text()))
        else:
            with np.load(out) as data:
                found.append([data[k] for k in sorted(data.files, key=lambda k: int(k.split("_")[1]))])
    return found


def assert_matches_x86(arm_outputs, x86_outputs):
    assert not isinstance(arm_outputs, dict), arm_outputs
    assert len(arm_outputs) == len(x86_outputs)
    for got, want in zip(arm_outputs, x86_outputs):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert compare_outputs(want, got).cosine >= 0.9999


def test_arm64_artifact_refused_on_x86(tmp_path):
    out = compile_model("mlp", tmp_path / "arm", CompileOptions(target="arm64"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64" and "+neon" in manifest["target"]["mattr"]
    with pytest.raises(TargetError, match="aarch64"):
        slimgraph.load(out)


@pytest.mark.realmodel
@pytest.mark.slow
def test_minilm_and_tiny_gpt_under_qemu_match_x86(userland, tmp_path):
    pairs = [build_pair("minilm", tmp_path, 12), build_pair("tiny-gpt", tmp_path, 9)]
    jobs = [(arm, inputs, tmp_path / f"out{i}.npz") for i, (arm, inputs, _) in enumerate(pairs)]
    for found, (_, _, want) in zip(run_under_qemu(userland, jobs), pairs):
        assert_matches_x86(found, want)


@pytest.mark.realmodel
@pytest.mark.slow
def test_int4_smollm2_under_qemu_matches_x86(userland, tmp_path):
    recipe = recipe_from_flags(quantize="int4", group_size=128)
    arm, inputs, want = build_pair("smollm2", tmp_path, 8, recipe=recipe)
    report = json.loads((arm / "report.json").read_text())
    assert any(p["name"] == "quantize" and p["changed"] for p in report["passes"])
    (found,) = run_under_qemu(userland, [(arm, inputs, tmp_path / "out.npz")])
    assert_matches_x86(found, want)


def test_dotprod_artifact_refused_by_a_cpu_without_it(userland, tmp_path):
    """Built for cortex-a76 (dotprod): runs on qemu's default CPU, refused on an emulated cortex-a72."""
    out = compile_model("mlp", tmp_path / "a76", CompileOptions(target="arm64", mcpu="cortex-a76"))
    module = load_model("mlp")[0]
    np.savez(tmp_path / "in.npz", **make_sample_inputs(module, seed=0, symbol_value=3))
    (ok,) = run_under_qemu(userland, [(out, tmp_path / "in.npz", tmp_path / "ok.npz")])
    assert not isinstance(ok, dict)
    (refused,) = run_under_qemu(userland, [(out, tmp_path / "in.npz", tmp_path / "no.npz")], cpu="cortex-a72")
    assert refused["error"] == TargetError.code and "dotprod" in refused["message"]

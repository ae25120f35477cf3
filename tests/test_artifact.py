"""Artifacts: compile a small module, load it back, run it; integrity, atomicity and input checks."""

import json

import numpy as np
import pytest

import slimgraph
from slimgraph.compiler import ops
from slimgraph.compiler.driver import CompileOptions, compile_model
from slimgraph.compiler.errors import (
    ArtifactIntegrityError, OutputExistsError, RuntimeInputError, UnsupportedOpsError,
)
from slimgraph.compiler.interpreter import run
from slimgraph.compiler.ir import FunctionBuilder, Module, Weight
from slimgraph.compiler.ops.registry import OpCategory, OpDef
from slimgraph.compiler.types import DType, TensorType

pytest.importorskip("tvm")


def mlp_module():
    rng = np.random.default_rng(1)
    weights = {"fc1.weight": Weight(rng.standard_normal((32, 16)).astype(np.float32)),
               "fc1.bias": Weight(rng.standard_normal(32).astype(np.float32)),
               "fc2.weight": Weight(rng.standard_normal((4, 32)).astype(np.float32)),
               "scale": Weight(np.asarray(0.5, np.float32))}  # a rank-0 weight must stay rank 0
    b = FunctionBuilder("main", weights)
    x = b.param("x", TensorType(DType.f32, ("B", 16)))
    h = b.add(ops.MATMUL, [x, b.add(ops.TRANSPOSE, ["@fc1.weight"], {"perm": (1, 0)})])
    h = b.add(ops.RELU, [b.add(ops.ADD, [h, "@fc1.bias"])])
    h = b.add(ops.MUL, [h, "@scale"])
    b.output(b.add(ops.MATMUL, [h, b.add(ops.TRANSPOSE, ["@fc2.weight"], {"perm": (1, 0)})]))
    return Module({"main": b.build()}, weights)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "mlp"
    compile_model(mlp_module(), out, CompileOptions())
    return out


def test_artifact_layout_and_manifest(artifact):
    names = {p.name for p in artifact.iterdir()}
    assert {"model.so", "weights.safetensors", "manifest.json", "report.json", "graph.ir"} <= names
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["target"]["name"] == "x86"
    assert manifest["tvm_version"].startswith("0.27")
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert manifest["entries"]["main"]["inputs"] == [["x", "f32[B,16]"]]
    report = json.loads((artifact / "report.json").read_text())
    assert [p["name"] for p in report["passes"]][:1] == ["fold_constants"]
    assert report["compile_seconds"]["total"] > 0


def test_run_matches_interpreter_by_name_and_position(artifact):
    model = slimgraph.load(artifact)
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    expected = run(mlp_module(), {"x": x})[0]
    np.testing.assert_allclose(model(x=x)[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_wrong_runtime_inputs(artifact):
    model = slimgraph.load(artifact)
    with pytest.raises(RuntimeInputError, match="'x': expected dtype f32"):
        model(np.zeros((3, 16), np.float64))
    with pytest.raises(RuntimeInputError, match=r"'x': expected shape f32\[B,16\]"):
        model(np.zeros((3, 15), np.float32))
    with pytest.raises(RuntimeInputError, match="missing"):
        model(y=np.zeros((3, 16), np.float32))


def test_tampered_file_is_refused(artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    with open(copy / "weights.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactIntegrityError, match="weights.safetensors.*sha256"):
        slimgraph.load(copy)


def test_existing_output_needs_force(artifact):
    with pytest.raises(OutputExistsError, match="--force"):
        compile_model(mlp_module(), artifact, CompileOptions())


def test_failed_compile_leaves_nothing(tmp_path):
    exotic = OpDef("exotic_test_op", OpCategory.ELEMENTWISE, lambda ins, a: ins[0], lambda ins, a, c: ins[0])
    b = FunctionBuilder("main", {})
    x = b.param("x", TensorType(DType.f32, (4,)))
    b.output(b.add(exotic, [b.add(exotic, [x])]))
    out = tmp_path / "never"
    with pytest.raises(UnsupportedOpsError, match="exotic_test_op: 2 node"):
        compile_model(Module({"main": b.build()}, {}), out, CompileOptions(passes=("dce",)))
    assert list(tmp_path.iterdir()) == []


def test_target_checked_before_loading(artifact, tmp_path):
    """An artifact built for CPU features this machine lacks is refused before its library loads."""
    import shutil

    from slimgraph.backends.artifact import seal_manifest
    from slimgraph.backends.targets_cpu import cpu_features, host_cpu
    from slimgraph.compiler.errors import TargetError

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    richer = next(cpu for cpu in ("sapphirerapids", "znver5", "graniterapids", "diamondrapids")
                  if cpu_features(cpu) - cpu_features(host_cpu()))
    manifest["target"]["mcpu"] = richer
    seal_manifest(copy, {k: v for k, v in manifest.items() if k not in ("files", "format", "format_version")})
    with pytest.raises(TargetError, match=f"built for CPU {richer}"):
        slimgraph.load(copy)
    manifest["target"]["arch"] = "aarch64"
    seal_manifest(copy, {k: v for k, v in manifest.items() if k not in ("files", "format", "format_version")})
    with pytest.raises(TargetError, match="aarch64"):
        slimgraph.load(copy)

"""ONNX frontend on bad input: each failure is a project error with its code, naming the file /
node / tensor, and never a raw library exception."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto as P
from onnx import helper as oh
from onnx import numpy_helper

from slimgraph.compiler.errors import (
    ExternalDataError, GraphStructureError, ModelLoadError, NonFiniteWeightError, ShapeMismatchError,
    ShapeSpecError, UnsupportedError, UnsupportedOpsError,
)
from slimgraph.compiler.frontends.onnx import import_onnx

F = P.FLOAT


def build(nodes, inputs, outputs, inits=(), opset=17):
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info(*i) for i in inputs],
                          [oh.make_tensor_value_info(o, F, None) for o in outputs], list(inits))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def save(model, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def linear_model(weight=None):
    weight = np.ones((4, 3), np.float32) if weight is None else weight
    return build([oh.make_node("MatMul", ["x", "w"], ["y"], name="proj")], [("x", F, ["T", 4])], ["y"],
                 [numpy_helper.from_array(weight, "w")])


def expect(error_cls, code, path, *fragments, **kw):
    """Import must raise error_cls with the given code and every fragment in its message."""
    with pytest.raises(error_cls) as info:
        import_onnx(path, **kw)
    err = info.value
    assert err.code == code
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    return err


# ----------------------------------------------------------------------------- unreadable files
def test_truncated_file(tmp_path):
    good = save(linear_model(np.ones((64, 64), np.float32)), tmp_path / "good.onnx")
    data = open(good, "rb").read()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    err = expect(ModelLoadError, "SG-201", str(bad), "truncated.onnx")
    assert err.__cause__ is None


@pytest.mark.parametrize("payload", [b"", b"\x00" * 7, b"\xff\xfe not a protobuf \x01\x02" * 50,
                                     np.random.default_rng(0).bytes(4096)], ids=["empty", "zeros", "text", "random"])
def test_garbage_file(tmp_path, payload):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(payload)
    expect(ModelLoadError, "SG-201", str(bad), "garbage.onnx")


def test_missing_file(tmp_path):
    expect(ModelLoadError, "SG-201", str(tmp_path / "nope.onnx"), "nope.onnx")


# ----------------------------------------------------------------------------- external data
def external_model(tmp_path, location: str, *, write_to: str | None = None, nbytes: int = 48) -> str:
    """A model whose weight `w` points at external `location` (file written at write_to if given)."""
    model = linear_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = P.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    if write_to is not None:
        with open(write_to, "wb") as f:
            f.write(np.ones(nbytes // 4, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    return save(model, folder / "m.onnx")


def test_external_data_parent_escape(tmp_path):
    path = external_model(tmp_path, "../secret.bin", write_to=str(tmp_path / "secret.bin"))
    expect(ExternalDataError, "SG-202", path, "m.onnx", "'w'", "../secret.bin", "outside the model folder")


def test_external_data_absolute_path(tmp_path):
    outside = str(tmp_path / "abs.bin")
    path = external_model(tmp_path, outside, write_to=outside)
    expect(ExternalDataError, "SG-202", path, "'w'", "absolute path")


def test_external_data_symlink_escape(tmp_path):
    outside = tmp_path / "outside.bin"
    path = external_model(tmp_path, "link.bin", write_to=str(outside))
    os.symlink(outside, tmp_path / "model" / "link.bin")
    expect(ExternalDataError, "SG-202", path, "'w'", "link.bin", "outside the model folder")


def test_external_data_missing_file(tmp_path):
    path = external_model(tmp_path, "weights.bin")
    expect(ExternalDataError, "SG-202", path, "'w'", "weights.bin", "not found")


def test_external_data_too_short(tmp_path):
    path = external_model(tmp_path, "weights.bin", nbytes=48)
    with open(tmp_path / "model" / "weights.bin", "wb") as f:
        f.write(b"\x00" * 20)
    expect(ExternalDataError, "SG-202", path, "'w'", "beyond the end")


def test_external_data_inside_folder_loads(tmp_path):
    path = external_model(tmp_path, "sub/../weights.bin", write_to=None)
    with open(tmp_path / "model" / "weights.bin", "wb") as f:
        f.write(np.ones(12, np.float32).tobytes())
    module = import_onnx(path)
    np.testing.assert_array_equal(module.weights["w"].array, np.ones((4, 3), np.float32))


# ----------------------------------------------------------------------------- graph structure
def test_cycle_names_node_and_tensor(tmp_path):
    nodes = [oh.make_node("Add", ["x", "b"], ["a"], name="first"),
             oh.make_node("Relu", ["a"], ["b"], name="second"),
             oh.make_node("Identity", ["b"], ["y"], name="out")]
    path = save(build(nodes, [("x", F, [2])], ["y"]), tmp_path / "cycle.onnx")
    expect(GraphStructureError, "SG-203", path, "cycle.onnx", "cycle", "'first'", "'second'", "'a'", "'b'")


def test_undefined_tensor(tmp_path):
    nodes = [oh.make_node("Add", ["x", "ghost"], ["y"], name="adder")]
    path = save(build(nodes, [("x", F, [2])], ["y"]), tmp_path / "undef.onnx")
    expect(GraphStructureError, "SG-203", path, "undef.onnx", "'adder'", "'ghost'")


def test_tensor_defined_twice(tmp_path):
    nodes = [oh.make_node("Relu", ["x"], ["y"], name="one"), oh.make_node("Neg", ["x"], ["y"], name="two")]
    path = save(build(nodes, [("x", F, [2])], ["y"]), tmp_path / "dup.onnx")
    expect(GraphStructureError, "SG-203", path, "'y'", "'two'")


# ----------------------------------------------------------------------------- shapes and weights
def test_matmul_shape_mismatch_names_node(tmp_path):
    path = save(linear_model(np.ones((5, 3), np.float32)), tmp_path / "mm.onnx")
    expect(ShapeMismatchError, "SG-204", path, "mm.onnx", "'proj'", "MatMul")


def test_reshape_mismatch_names_node(tmp_path):
    nodes = [oh.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")]
    inits = [numpy_helper.from_array(np.array([5, -1]), "shape")]
    path = save(build(nodes, [("x", F, [2, 3])], ["y"], inits), tmp_path / "rs.onnx")
    expect(ShapeMismatchError, "SG-204", path, "'bad_reshape'")


def test_broadcast_mismatch_names_node(tmp_path):
    nodes = [oh.make_node("Add", ["x", "z"], ["y"], name="bad_add")]
    path = save(build(nodes, [("x", F, [2, 3]), ("z", F, [4])], ["y"]), tmp_path / "add.onnx")
    expect(ShapeMismatchError, "SG-204", path, "'bad_add'", "Add")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_initializer(tmp_path, bad):
    weight = np.ones((4, 3), np.float32)
    weight[2, 1] = bad
    path = save(linear_model(weight), tmp_path / "nan.onnx")
    expect(NonFiniteWeightError, "SG-205", path, "nan.onnx", "'w'", "flat index 7")


def test_unsupported_ops_are_all_listed(tmp_path):
    nodes = [oh.make_node("Relu", ["x"], ["a"], name="fine"),
             oh.make_node("Hardmax", ["a"], ["b"], name="hm1"), oh.make_node("Hardmax", ["b"], ["c"], name="hm2"),
             oh.make_node("Celu", ["c"], ["d"], name="celu"),
             oh.make_node("Custom", ["d"], ["y"], name="custom", domain="my.domain")]
    model = build(nodes, [("x", F, [2, 3])], ["y"])
    model.opset_import.append(oh.make_opsetid("my.domain", 1))
    path = save(model, tmp_path / "unsup.onnx")
    err = expect(UnsupportedOpsError, "SG-301", path, "unsup.onnx", "Hardmax", "hm1", "Celu", "Custom")
    assert err.missing == {"Hardmax": (2, "hm1"), "Celu": (1, "celu"), "my.domain::Custom": (1, "custom")}


def test_old_opset_rejected(tmp_path):
    path = save(build([oh.make_node("Relu", ["x"], ["y"])], [("x", F, [2])], ["y"], opset=11), tmp_path / "old.onnx")
    expect(UnsupportedError, "SG-300", path, "opset 11")


def test_data_dependent_reshape_is_unsupported(tmp_path):
    nodes = [oh.make_node("Reshape", ["x", "s"], ["y"], name="dyn_reshape")]
    path = save(build(nodes, [("x", F, [6]), ("s", P.INT64, [2])], ["y"]), tmp_path / "dyn.onnx")
    expect(UnsupportedError, "SG-300", path, "'dyn_reshape'", "'s'", "known at import time")


def test_shape_spec_errors(tmp_path):
    path = save(linear_model(), tmp_path / "lin.onnx")
    expect(ShapeSpecError, "SG-105", path, "'nope'", shapes={"nope": (1, 4)})
    expect(ShapeSpecError, "SG-105", path, "'x'", "rank", shapes={"x": (1, 2, 4)})
    expect(ShapeSpecError, "SG-105", path, "static dim 4", shapes={"x": (3, 5)})
    module = import_onnx(path, shapes={"x": (3, 4)})
    assert module.main.params[0].type.shape == (3, 4)


def test_non_polynomial_shape_value_needs_fixed_dims(tmp_path):
    """Reshape to [2, T // 2]: floor(T/2) has no IR dim form unless T is fixed by `shapes`."""
    nodes = [oh.make_node("Shape", ["x"], ["s"]), oh.make_node("Div", ["s", "two"], ["half"]),
             oh.make_node("Concat", ["two", "half"], ["shape"], axis=0),
             oh.make_node("Reshape", ["x", "shape"], ["y"], name="halve")]
    inits = [numpy_helper.from_array(np.array([2]), "two")]
    path = save(build(nodes, [("x", F, ["T"])], ["y"], inits), tmp_path / "half.onnx")
    expect(UnsupportedError, "SG-300", path, "'halve'", "floor(T/2)", "shapes=")
    module = import_onnx(path, shapes={"x": (8,)})
    assert module.main.output_types()[0].shape == (2, 4)

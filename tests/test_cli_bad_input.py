"""Every bad input from the command line: the right exit code, a message naming the file, node or
tensor, no traceback, and no output directory left behind."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_onnx_bad_input import build, external_model, linear_model, save, F  # noqa: F401

onnx_helper = pytest.importorskip("onnx.helper")


def compile_cli(model, out):
    proc = subprocess.run([sys.executable, "-m", "slimgraph.compiler.cli", "compile", str(model), "-o", str(out),
                           "--json"], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists(), "partial output left behind"
    return proc.returncode, json.loads(proc.stdout)["error"]["message"] if proc.stdout.strip() else proc.stderr


def nan_onnx(tmp_path):
    weight = np.ones((4, 3), np.float32)
    weight[1, 2] = np.nan
    return save(linear_model(weight), tmp_path / "nan.onnx"), ["nan.onnx", "'w'"]


def escaping_external_data(tmp_path):
    (tmp_path / "secret.bin").write_bytes(np.ones(12, np.float32).tobytes())
    return external_model(tmp_path, "../secret.bin"), ["m.onnx", "../secret.bin"]


def missing_external_data(tmp_path):
    return external_model(tmp_path, "weights.bin"), ["weights.bin"]


def cyclic_onnx(tmp_path):
    nodes = [onnx_helper.make_node("Add", ["x", "b"], ["a"], name="first"),
             onnx_helper.make_node("Relu", ["a"], ["b"], name="second"),
             onnx_helper.make_node("Identity", ["b"], ["y"], name="out")]
    return save(build(nodes, [("x", F, [2])], ["y"]), tmp_path / "cycle.onnx"), ["cycle.onnx", "'first'"]


def undefined_tensor_onnx(tmp_path):
    nodes = [onnx_helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")]
    return save(build(nodes, [("x", F, [2])], ["y"]), tmp_path / "undef.onnx"), ["'adder'", "'ghost'"]


def mismatched_shapes_onnx(tmp_path):
    return save(linear_model(np.ones((5, 3), np.float32)), tmp_path / "mm.onnx"), ["mm.onnx", "'proj'"]


def truncated_onnx(tmp_path):
    full = tmp_path / "full.onnx"
    save(linear_model(), full)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(full.read_bytes()[:-20])
    os.remove(full)
    return str(cut), ["cut.onnx"]


def unsafe_checkpoint_folder(tmp_path):
    from transformers import BertConfig

    folder = tmp_path / "hf"
    folder.mkdir()
    BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(folder)
    torch.save({"weights": {"a": torch.ones(2)}, "callback": np.random.default_rng}, folder / "pytorch_model.bin")
    return str(folder), ["pytorch_model.bin", "weights_only"]


def unsupported_onnx(tmp_path):
    nodes = [onnx_helper.make_node("Hardmax", ["x"], ["a"], name="hm1"),
             onnx_helper.make_node("Celu", ["a"], ["y"], name="celu")]
    return save(build(nodes, [("x", F, [2, 3])], ["y"]), tmp_path / "unsup.onnx"), ["Hardmax", "hm1", "Celu"]


BAD_INPUT = [nan_onnx, escaping_external_data, missing_external_data, cyclic_onnx, undefined_tensor_onnx,
             mismatched_shapes_onnx, truncated_onnx, unsafe_checkpoint_folder]


@pytest.mark.parametrize("make", BAD_INPUT, ids=[f.__name__ for f in BAD_INPUT])
def test_bad_input_exit_code_3(make, tmp_path):
    path, fragments = make(tmp_path)
    code, message = compile_cli(path, tmp_path / "out")
    assert code == 3, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_unsupported_exit_code_4(tmp_path):
    path, fragments = unsupported_onnx(tmp_path)
    code, message = compile_cli(path, tmp_path / "out")
    assert code == 4
    for fragment in fragments:
        assert fragment in message


def test_plain_state_dict_checkpoint_folder_imports(tmp_path):
    """The counterpart of the unsafe case: a folder with a plain pytorch_model.bin state dict loads."""
    from transformers import BertConfig, BertModel

    from slimgraph.compiler.frontends.huggingface import import_hf_folder

    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    torch.manual_seed(0)
    model = BertModel(config)
    config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    module = import_hf_folder(tmp_path)
    position = module.weights["embeddings.position_embeddings.weight"].array
    np.testing.assert_array_equal(position, model.embeddings.position_embeddings.weight.detach().numpy())

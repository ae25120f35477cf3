"""Perplexity from a compiled artifact equals the same computation with PyTorch."""

import math

import numpy as np
import pytest
import torch

import slimgraph
from slimgraph.compiler.driver import CompileOptions, compile_model
from slimgraph.compiler.errors import UsageError
from slimgraph.compiler.evaluation import perplexity, window_nll
from slimgraph.models.registry import reference_torch_model

pytest.importorskip("tvm")


def test_window_nll_matches_definition():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, 5)
    logp = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    expected = -sum(logp[i, ids[i + 1]] for i in range(4))
    assert math.isclose(window_nll(logits, ids), expected, rel_tol=1e-12)


def test_uniform_model_has_vocab_perplexity():
    result = perplexity(lambda ids: np.zeros(ids.shape + (50,), np.float32), np.arange(23) % 50, window=8)
    assert math.isclose(result.perplexity, 50.0, rel_tol=1e-9)
    assert (result.windows, result.predicted_tokens) == (3, 7 + 7 + 6)


def test_bad_arguments():
    with pytest.raises(UsageError):
        perplexity(lambda ids: None, [1], window=8)
    with pytest.raises(UsageError):
        perplexity(lambda ids: None, [1, 2, 3], window=1)


def test_artifact_perplexity_matches_torch(tmp_path):
    compile_model("tiny-gpt", tmp_path / "gpt", CompileOptions())
    model = slimgraph.load(tmp_path / "gpt")
    reference, _ = reference_torch_model("tiny-gpt")
    ids = np.random.default_rng(1).integers(0, 256, 100)

    def torch_logits(batch):
        with torch.no_grad():
            return reference(input_ids=torch.from_numpy(batch)).numpy()

    ours = perplexity(lambda batch: model(input_ids=batch)[0], ids, window=32)
    theirs = perplexity(torch_logits, ids, window=32)
    assert ours.predicted_tokens == theirs.predicted_tokens == 31 * 3 + 3  # windows of 32, 32, 32, 4
    assert math.isclose(ours.perplexity, theirs.perplexity, rel_tol=1e-5)

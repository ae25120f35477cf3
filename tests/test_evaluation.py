"""Perplexity from a compiled artifact equals the same computation with PyTorch; embedding fidelity's
pooling and cosine follow their definitions, and a compiled fp32 MiniLM matches transformers."""

import json
import math

import numpy as np
import pytest
import torch

import slimgraph
from slimgraph.compiler.driver import CompileOptions, compile_model
from slimgraph.compiler.errors import UsageError
from slimgraph.compiler.evaluation import (embedding_fidelity, mean_pool, perplexity, sentence_batches,
                                         split_sentences, window_nll)
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


def _batch(mask):
    return {"attention_mask": np.asarray(mask, np.int64)[None, :]}


def test_identical_embeddings_have_cosine_one():
    hidden = np.random.default_rng(2).standard_normal((1, 6, 8)).astype(np.float32)
    result = embedding_fidelity(lambda b: hidden, lambda b: 3.0 * hidden, [_batch([1] * 6)] * 3)
    assert math.isclose(result.mean_cosine, 1.0, abs_tol=1e-12) and math.isclose(result.min_cosine, 1.0, abs_tol=1e-12)
    assert result.sentences == 3


def test_orthogonal_embeddings_have_cosine_zero():
    ours, theirs = np.zeros((1, 2, 4)), np.zeros((1, 2, 4))
    ours[..., 0], theirs[..., 1] = 1.0, 2.0
    result = embedding_fidelity(lambda b: ours, lambda b: theirs, [_batch([1, 1])])
    assert math.isclose(result.mean_cosine, 0.0, abs_tol=1e-12)


def test_masked_positions_are_ignored():
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((1, 5, 4))
    noisy = hidden.copy()
    noisy[0, 3:] = rng.standard_normal((2, 4)) * 100  # only masked-out positions differ
    mask = [1, 1, 1, 0, 0]
    pooled = mean_pool(hidden, _batch(mask)["attention_mask"])[0]
    expected = hidden[0, :3].mean(axis=0)
    np.testing.assert_allclose(pooled, expected / np.linalg.norm(expected), rtol=1e-12)
    result = embedding_fidelity(lambda b: noisy, lambda b: hidden, [_batch(mask)])
    assert math.isclose(result.mean_cosine, 1.0, abs_tol=1e-12)


def test_cosine_statistics_over_sentences():
    angles = [0.0, 0.5, 1.0]
    vectors = [np.array([[[np.cos(a), np.sin(a)]]]) for a in angles]
    batches = [{"attention_mask": np.ones((1, 1), np.int64), "index": np.array(i)} for i in range(3)]
    result = embedding_fidelity(lambda b: vectors[int(b["index"])], lambda b: np.array([[[1.0, 0.0]]]), batches)
    assert math.isclose(result.mean_cosine, np.mean(np.cos(angles)), rel_tol=1e-12)
    assert math.isclose(result.min_cosine, np.cos(1.0), rel_tol=1e-12)
    assert result.min_cosine <= result.p05_cosine <= result.mean_cosine


def test_sentences_split_and_filtered_by_token_count():
    text = "One two three. Four five six seven.\n\nA b c d e f g h i j. Short."
    assert split_sentences(text) == ["One two three.", "Four five six seven.", "A b c d e f g h i j.", "Short."]

    def encode(sentence):  # one id per word
        return list(range(len(sentence.split())))

    batches = sentence_batches(text, encode, max_sentences=5, min_tokens=3, max_tokens=4)
    assert [b["input_ids"].shape for b in batches] == [(1, 3), (1, 4)]
    assert all((b["attention_mask"] == 1).all() for b in batches)
    assert len(sentence_batches(text, encode, max_sentences=1, min_tokens=1)) == 1
    with pytest.raises(UsageError):
        sentence_batches(text, encode, max_sentences=0)
    with pytest.raises(UsageError):
        embedding_fidelity(lambda b: None, lambda b: None, [])


@pytest.mark.realmodel
def test_compiled_minilm_embeddings_match_transformers(tmp_path, capsys):
    from slimgraph.compiler.cli import main

    compile_model("minilm", tmp_path / "minilm", CompileOptions())
    code = main(["eval", str(tmp_path / "minilm"), "--metric", "embedding", "--max-sentences", "8", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["ok"] and result["sentences"] == 8
    assert result["mean_cosine"] > 0.99999 and result["min_cosine"] > 0.9999

"""The token sampler against transformers' logits processors, and its own invariants."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from slimgraph.backends.sampling import SamplingOptions, TokenSampler, keep_top_k, keep_top_p, penalize_repeats
from slimgraph.compiler.errors import SamplingOptionError

VOCAB = 50
logit_arrays = arrays(np.float32, VOCAB, elements=st.floats(-20, 20, width=32), unique=True)


def _hf(processors, logits, history):
    ids = torch.tensor([list(history) or [0]])
    scores = torch.from_numpy(logits.copy())[None]
    for proc in processors:
        scores = proc(ids, scores)
    return scores[0].numpy()


@pytest.mark.parametrize("seed", range(20))
def test_processing_matches_transformers(seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
    history = rng.integers(0, VOCAB, 12).tolist()
    options = SamplingOptions(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3, seed=seed)
    expected = _hf([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                    TopPLogitsWarper(0.8)], logits, history)
    probs = TokenSampler(options).distribution(logits, history)
    assert np.array_equal(probs > 0, np.isfinite(expected))
    hf_probs = torch.softmax(torch.from_numpy(expected), 0).numpy()
    np.testing.assert_allclose(probs, hf_probs, atol=1e-6)


@given(logit_arrays, st.lists(st.integers(0, VOCAB - 1), max_size=10), st.floats(0.5, 2.0))
def test_repetition_penalty_matches_transformers(logits, history, penalty):
    expected = _hf([RepetitionPenaltyLogitsProcessor(penalty)], logits, history) if history else logits
    np.testing.assert_allclose(penalize_repeats(logits, history, penalty), expected, rtol=1e-6)


@given(logit_arrays, st.integers(1, VOCAB))
def test_top_k_keeps_the_k_largest(logits, k):
    kept = np.isfinite(keep_top_k(logits, k))
    assert kept.sum() == k and logits[kept].min() >= logits[~kept].max(initial=-np.inf)


@settings(max_examples=200)
@given(logit_arrays, st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p):
    kept = np.isfinite(keep_top_p(logits, p))
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    mass = probs[kept].sum()
    assert mass >= p - 1e-9
    assert probs[kept].min() >= probs[~kept].max(initial=0.0)
    assert mass - probs[kept].min() < p + 1e-9  # without its least probable token the set falls short


def test_greedy_takes_the_arg_max_after_the_penalty():
    logits = np.array([1.0, 5.0, 4.0], np.float32)
    assert TokenSampler(SamplingOptions()).choose(logits, []) == 1
    assert TokenSampler(SamplingOptions(repetition_penalty=2.0)).choose(logits, [1]) == 2


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = np.zeros(1000, np.float32)

    def draw(seed):
        sampler = TokenSampler(SamplingOptions(temperature=1.0, seed=seed))
        return [sampler.choose(logits, []) for _ in range(20)]

    assert draw(7) == draw(7) and draw(7) != draw(8)


def test_stop_token_and_length_end_generation():
    sampler = TokenSampler(SamplingOptions(max_new_tokens=3, stop_tokens=(2,)))
    assert sampler.finished(2, 1) and sampler.finished(5, 3) and not sampler.finished(5, 2)


@pytest.mark.parametrize("settings_, words", [
    ({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_settings_are_refused_by_name(settings_, words):
    with pytest.raises(SamplingOptionError, match=words) as info:
        SamplingOptions(**settings_)
    assert info.value.code == "SG-108"

"""Pruning criteria on small random layers: exact per-column / N:M sparsity, agreement with a plain
numpy reference, and the expected quality order magnitude > Wanda > SparseGPT on output error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimgraph.compiler.errors import CompressionOptionError
from slimgraph.passes.pruning_criteria import (
    magnitude_mask, neuron_importance, sparsegpt_prune, wanda_mask,
)


def correlated_inputs(M=2048, K=128, outliers=4, seed=0) -> np.ndarray:
    """Tokens with correlated channels (a random mixing) and a few channels 20x larger."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) / np.sqrt(K) + 0.5 * np.eye(K)
    X = rng.standard_normal((M, K)) @ mix
    X[:, rng.choice(K, outliers, replace=False)] *= 20.0
    return X


def hessian_of(X: np.ndarray) -> np.ndarray:
    return X.T @ X / X.shape[0]


def output_error(X, W, W_hat) -> float:
    return float(np.linalg.norm(X @ W - X @ W_hat))


def reference_magnitude_mask(W, sparsity):
    K, N = W.shape
    keep = np.ones_like(W, dtype=bool)
    for n in range(N):
        order = np.argsort(np.abs(W[:, n]), kind="stable")
        keep[order[: int(np.floor(sparsity * K + 1e-9))], n] = False
    return keep


def random_layer(K, N, seed):
    return np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(K=st.integers(1, 40), N=st.integers(1, 12), sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_magnitude_mask_matches_reference_with_exact_column_sparsity(K, N, sparsity, seed):
    W = random_layer(K, N, seed)
    keep = magnitude_mask(W, sparsity)
    np.testing.assert_array_equal(keep, reference_magnitude_mask(W, sparsity))
    assert (keep.sum(axis=0) == K - int(np.floor(sparsity * K + 1e-9))).all()


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 8), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]),
       N=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_n_m_masks_have_the_exact_pattern_and_keep_the_largest(groups, nm, N, seed):
    n, m = nm
    W = random_layer(groups * m, N, seed)
    H = hessian_of(correlated_inputs(M=64, K=groups * m, outliers=1, seed=seed))
    for keep in (magnitude_mask(W, 0.0, n_m=nm), wanda_mask(W, H, 0.0, n_m=nm),
                 sparsegpt_prune(W, H, 0.0, n_m=nm)[1]):
        assert (keep.reshape(groups, m, N).sum(axis=1) == n).all()
    grouped = np.abs(W).reshape(groups, m, N)
    kept_min = np.where(magnitude_mask(W, 0.0, n_m=nm).reshape(groups, m, N), grouped, np.inf).min(axis=1)
    dropped_max = np.where(magnitude_mask(W, 0.0, n_m=nm).reshape(groups, m, N), -np.inf, grouped).max(axis=1)
    assert (kept_min >= dropped_max).all()


def test_wanda_equals_magnitude_when_input_norms_are_equal():
    W = random_layer(64, 16, 1)
    rng = np.random.default_rng(2)
    H = rng.standard_normal((64, 64)) * 0.1
    H = H + H.T
    np.fill_diagonal(H, 3.0)  # equal diagonal => equal channel norms, off-diagonal ignored
    for kwargs in ({"sparsity": 0.6}, {"sparsity": 0.0, "n_m": (2, 4)}):
        np.testing.assert_array_equal(wanda_mask(W, H, **kwargs), magnitude_mask(W, **kwargs))


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_output_error_order_magnitude_wanda_sparsegpt(n_m):
    X = correlated_inputs()
    H = hessian_of(X)
    W = random_layer(128, 48, 3)
    err_mag = output_error(X, W, W * magnitude_mask(W, 0.5, n_m=n_m))
    err_wanda = output_error(X, W, W * wanda_mask(W, H, 0.5, n_m=n_m))
    W_sparse, keep = sparsegpt_prune(W, H, 0.5, n_m=n_m, block_size=32)
    err_sgpt = output_error(X, W, W_sparse)
    assert err_wanda < 0.5 * err_mag  # outlier channels: magnitude drops the weights that matter
    assert err_sgpt < 0.9 * err_wanda  # OBS reconstruction on top of a better mask
    assert (keep.sum(axis=0) == 64).all()


def test_sparsegpt_zeros_exactly_where_its_mask_says_and_block_size_only_changes_rounding():
    X = correlated_inputs(M=512, K=96, seed=5)
    H = hessian_of(X)
    W = random_layer(96, 20, 4)
    W_sparse, keep = sparsegpt_prune(W, H, 0.3, block_size=40)
    assert W_sparse.dtype == W.dtype
    np.testing.assert_array_equal(W_sparse != 0, keep)
    assert (keep.sum(axis=0) == 96 - 28).all()
    same, keep0 = sparsegpt_prune(W, H, 0.0)
    assert keep0.all()
    np.testing.assert_allclose(same, W, rtol=1e-5, atol=1e-5)


def test_sparsegpt_handles_dead_inputs_and_singular_hessians():
    X = correlated_inputs(M=40, K=64, seed=6)  # fewer tokens than channels: H singular
    X[:, [3, 17]] = 0.0  # dead inputs
    H = hessian_of(X)
    W = random_layer(64, 8, 7)
    W_sparse, keep = sparsegpt_prune(W, H, 0.5)
    assert np.isfinite(W_sparse).all()
    assert not keep[[3, 17]].any()  # dead rows cost nothing: pruned first
    assert output_error(X, W, W_sparse) < output_error(X, W, W * wanda_mask(W, H, 0.5))


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_out_of_range_sparsity_raises(sparsity):
    W = random_layer(8, 4, 0)
    H = np.eye(8)
    for call in (lambda: magnitude_mask(W, sparsity), lambda: wanda_mask(W, H, sparsity),
                 lambda: sparsegpt_prune(W, H, sparsity)):
        with pytest.raises(ValueError, match="sparsity must be in"):
            call()


@pytest.mark.parametrize("n_m, message", [((2, 2), "0 < n < m"), ((0, 4), "0 < n < m"),
                                          ((2, 3), "multiple of m"), ("2:4", "pair")])
def test_bad_n_m_raises_a_usage_error(n_m, message):
    W = random_layer(8, 4, 0)
    with pytest.raises(CompressionOptionError, match=message):
        magnitude_mask(W, 0.5, n_m=n_m)
    with pytest.raises(ValueError, match=message):
        sparsegpt_prune(W, np.eye(8), 0.5, n_m=n_m)


def test_neuron_importance_ranks_a_dead_output_row_lowest():
    rng = np.random.default_rng(8)
    W_gate, W_up = rng.standard_normal((16, 10)), rng.standard_normal((16, 10))
    W_out = rng.standard_normal((10, 12))
    W_out[6] = 0.0
    act_sq = rng.uniform(0.5, 2.0, 10)
    for scores in (neuron_importance([W_gate, W_up], W_out, act_sq), neuron_importance([W_gate, W_up], W_out)):
        assert scores.shape == (10,)
        assert np.argmin(scores) == 6 and scores[6] == 0.0
    h = rng.standard_normal((500, 10)) * np.sqrt(act_sq)
    contribution = np.sqrt(np.mean(np.sum((h[:, :, None] * W_out[None]) ** 2, axis=2), axis=0))
    np.testing.assert_allclose(neuron_importance([], W_out, np.mean(h**2, axis=0)), contribution, rtol=1e-10)

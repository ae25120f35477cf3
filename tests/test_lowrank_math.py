"""Low-rank factorizations: exact at full rank, Eckart-Young error for plain SVD, lower output
error for the activation-aware variants, and the rank-choice arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimgraph.passes.lowrank_math import (
    asvd_factorize, rank_for, svd_factorize, whitened_factorize, worth_factorizing,
)


def random_layer(K, N, seed, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal((K, N)).astype(dtype)


def correlated_inputs(M=1024, K=64, outliers=0, seed=0) -> np.ndarray:
    """Tokens whose channels are strongly correlated (decaying spectrum), optionally with a few
    channels 30x larger than the rest."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) * (0.85 ** np.arange(K))[:, None]
    X = rng.standard_normal((M, K)) @ mix
    if outliers:
        X[:, rng.choice(K, outliers, replace=False)] *= 30.0
    return X


def output_error(X, W, U, V) -> float:
    return float(np.linalg.norm(X @ W - (X @ U) @ V))


@settings(max_examples=25, deadline=None)
@given(K=st.integers(1, 24), N=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_svd_full_rank_is_exact_and_truncation_error_is_the_tail(K, N, seed):
    W = random_layer(K, N, seed)
    U, V = svd_factorize(W, min(K, N))
    np.testing.assert_allclose(U @ V, W, atol=1e-10)
    sigma = np.linalg.svd(W, compute_uv=False)
    for rank in range(1, min(K, N) + 1):
        U, V = svd_factorize(W, rank)
        assert U.shape == (K, rank) and V.shape == (rank, N)
        tail = np.sqrt(np.sum(sigma[rank:] ** 2))
        np.testing.assert_allclose(np.linalg.norm(W - U @ V), tail, atol=1e-9)


def test_factors_keep_the_weight_dtype_and_split_singular_values_evenly():
    W = random_layer(32, 48, 1, np.float32)
    for U, V in (svd_factorize(W, 8), asvd_factorize(W, np.ones(32), 8), whitened_factorize(W, np.eye(32), 8)):
        assert U.dtype == V.dtype == np.float32
    U, V = svd_factorize(W, 8)
    np.testing.assert_allclose(np.linalg.norm(U, axis=0), np.linalg.norm(V, axis=1), rtol=1e-4)


def test_whitened_beats_plain_svd_on_correlated_inputs_and_is_exact_at_full_rank():
    X = correlated_inputs()
    H = X.T @ X / X.shape[0]
    W = random_layer(64, 96, 2)
    for rank in (4, 16, 32):
        plain = output_error(X, W, *svd_factorize(W, rank))
        whitened = output_error(X, W, *whitened_factorize(W, H, rank))
        assert whitened < 0.7 * plain
    # the discarded singular values of L^T W are the output error (up to damping)
    L = np.linalg.cholesky(H)
    sigma = np.linalg.svd(L.T @ W, compute_uv=False)
    expected = np.sqrt(X.shape[0] * np.sum(sigma[16:] ** 2))
    np.testing.assert_allclose(output_error(X, W, *whitened_factorize(W, H, 16, damp=1e-10)), expected, rtol=1e-4)
    U, V = whitened_factorize(W, H, 64)
    np.testing.assert_allclose(U @ V, W, atol=1e-8)


def test_whitened_handles_singular_and_zero_hessians():
    X = correlated_inputs(M=20, K=64, seed=3)  # fewer tokens than channels
    X[:, 5] = 0.0
    W = random_layer(64, 32, 3)
    U, V = whitened_factorize(W, X.T @ X / 20, 8)
    assert np.isfinite(U).all() and np.isfinite(V).all()
    U0, V0 = whitened_factorize(W, np.zeros((64, 64)), 8)  # no signal: plain SVD
    Up, Vp = svd_factorize(W, 8)
    np.testing.assert_allclose(U0 @ V0, Up @ Vp, atol=1e-10)


def test_asvd_beats_plain_svd_on_outlier_channels():
    X = correlated_inputs(outliers=4, seed=4)
    W = random_layer(64, 96, 5)
    abs_mean = np.abs(X).mean(axis=0)
    for rank in (8, 16, 32):
        plain = output_error(X, W, *svd_factorize(W, rank))
        asvd = output_error(X, W, *asvd_factorize(W, abs_mean, rank))
        assert asvd < 0.9 * plain
    U, V = asvd_factorize(W, abs_mean, 64)
    np.testing.assert_allclose(U @ V, W, atol=1e-8)
    abs_mean[3] = 0.0  # a dead channel keeps S invertible
    assert np.isfinite(asvd_factorize(W, abs_mean, 8)[0]).all()


def test_rank_for_ratio_and_worth_factorizing_examples():
    # 576x1536 at ratio 0.2: floor(0.8 * 576*1536 / 2112) = floor(335.1) = 335
    assert rank_for(576, 1536, ratio=0.2) == 335
    assert worth_factorizing(576, 1536, 335)
    assert 335 * (576 + 1536) <= 0.8 * 576 * 1536
    assert rank_for(1536, 576, ratio=0.2) == 335
    assert not worth_factorizing(576, 1536, 419)  # break-even rank K*N/(K+N) = 418.9
    assert worth_factorizing(576, 1536, 418)
    assert not worth_factorizing(576, 1536, 576)
    assert rank_for(4, 4, ratio=0.99) == 1  # clamped to at least rank 1


def test_rank_for_energy():
    sigma = np.array([3.0, 2.0, 1.0, 1.0, 0.0])  # power 9, 4, 1, 1 of 15
    assert rank_for(5, 8, energy=9 / 15, singular_values=sigma) == 1
    assert rank_for(5, 8, energy=0.61, singular_values=sigma) == 2
    assert rank_for(5, 8, energy=14 / 15, singular_values=sigma) == 3
    assert rank_for(5, 8, energy=1.0, singular_values=sigma) == 4
    assert rank_for(5, 8, energy=0.5, singular_values=np.zeros(5)) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 0.0}, "ratio must be in"), ({"ratio": 1.0}, "ratio must be in"), ({"ratio": -0.5}, "ratio must be in"),
    ({"energy": 0.0, "singular_values": np.ones(3)}, "energy must be in"),
    ({"energy": 1.5, "singular_values": np.ones(3)}, "energy must be in"),
    ({"energy": 0.9}, "needs the layer's singular_values"),
    ({}, "exactly one"), ({"ratio": 0.5, "energy": 0.5}, "exactly one"),
])
def test_rank_for_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rank_for(8, 8, **kwargs)


@pytest.mark.parametrize("rank", [0, 9, 2.5])
def test_factorizations_reject_bad_ranks(rank):
    W = random_layer(8, 12, 0)
    for call in (lambda: svd_factorize(W, rank), lambda: asvd_factorize(W, np.ones(8), rank),
                 lambda: whitened_factorize(W, np.eye(8), rank)):
        with pytest.raises(ValueError, match="rank must be an integer"):
            call()

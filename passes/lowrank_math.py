"""Low-rank factorization of linear layers: ``W [K, N] ~ U [K, r] @ V [r, N]``, so ``x @ W`` becomes
``(x @ U) @ V`` with ``r * (K + N)`` weights and multiply-adds per token instead of ``K * N``.

Three factorizations, all a truncated SVD of some transformed weight:

* :func:`svd_factorize` minimises the weight error ``||W - U V||_F`` (Eckart-Young);
* :func:`asvd_factorize` (ASVD, Yuan et al. 2023) first scales input row k by ``|x_k|^alpha``, so
  rows fed by large activations are approximated more carefully;
* :func:`whitened_factorize` (SVD-LLM, Wang et al. 2024) minimises the *output* error
  ``||X W - X U V||_F`` exactly, via the Cholesky factor of the calibration Hessian.

Factors are returned in W's dtype, computed in float64. The singular values are split evenly,
``U = U' sqrt(S)``, ``V = sqrt(S) V'``, so both factors have the same dynamic range (friendlier to
later quantization than putting all of S on one side).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from slimgraph.compiler.errors import ShapeMismatchError
from slimgraph.passes.pruning_criteria import CompressionSettingError


# ----------------------------------------------------------------------------- rank choice
def rank_for(K: int, N: int, *, ratio: float | None = None, energy: float | None = None,
             singular_values: np.ndarray | None = None) -> int:
    """Rank for a ``[K, N]`` layer; give exactly one of ``ratio`` and ``energy``.

    * ``ratio`` in (0, 1): fraction of the layer's ``K*N`` parameters to remove. Rank r costs
      ``r (K + N)``, so ``r = floor((1 - ratio) K N / (K + N))``.
    * ``energy`` in (0, 1] (needs ``singular_values``): smallest r with
      ``sum_{i<r} sigma_i^2 >= energy * sum_i sigma_i^2`` (kept fraction of ``||W||_F^2``).

    The result is clamped to ``[1, min(K, N)]``. Whether rank r is worth it at all is
    :func:`worth_factorizing`'s call.
    """
    if K < 1 or N < 1:
        raise ShapeMismatchError(f"rank_for needs a non-empty layer, got K={K}, N={N}")
    if (ratio is None) == (energy is None):
        raise CompressionSettingError("rank_for needs exactly one of ratio= (params to remove) or energy=")
    if ratio is not None:
        if not 0.0 < float(ratio) < 1.0:
            raise CompressionSettingError(
                f"ratio must be in (0, 1) (the fraction of the layer's parameters to remove), got {ratio!r}")
        rank = math.floor((1.0 - ratio) * K * N / (K + N) + 1e-9)
    else:
        rank = _rank_for_energy(energy, singular_values)
    return int(min(max(rank, 1), K, N))


def _rank_for_energy(energy: float, singular_values: np.ndarray | None) -> int:
    if not 0.0 < float(energy) <= 1.0:
        raise CompressionSettingError(f"energy must be in (0, 1] (the kept fraction of sum sigma^2), got {energy!r}")
    if singular_values is None:
        raise CompressionSettingError("rank_for(energy=...) needs the layer's singular_values")
    power = np.sort(np.asarray(singular_values, dtype=np.float64).ravel() ** 2)[::-1]
    total = power.sum()
    if power.size == 0 or total <= 0.0:
        return 1
    kept = np.cumsum(power) / total
    return int(np.searchsorted(kept, energy - 1e-12) + 1)


def worth_factorizing(K: int, N: int, rank: int) -> bool:
    """True when ``U V`` has fewer weights, and so fewer multiply-adds per token, than W:
    ``rank (K + N) < K N``, i.e. ``rank < K N / (K + N)`` (about ``min(K,N)/2`` for square-ish W)."""
    return 0 < rank and rank * (K + N) < K * N


def _check_rank(W: np.ndarray, rank: int) -> np.ndarray:
    W = np.asarray(W)
    if W.ndim != 2:
        raise ShapeMismatchError(f"a linear weight must be 2-D [K, N], got shape {W.shape}")
    if not (isinstance(rank, (int, np.integer)) and 1 <= rank <= min(W.shape)):
        raise CompressionSettingError(
            f"rank must be an integer in [1, {min(W.shape)}] for a weight {W.shape}, got {rank!r}")
    return W


# ----------------------------------------------------------------------------- factorizations
def _truncated_svd(A: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-r approximation ``A ~ P Q`` with ``P = U' sqrt(S)``, ``Q = sqrt(S) V'``."""
    left, sigma, right = np.linalg.svd(A, full_matrices=False)
    root = np.sqrt(sigma[:rank])
    return left[:, :rank] * root[None, :], root[:, None] * right[:rank]


def svd_factorize(W: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain truncated SVD: ``W ~ U @ V`` with ``U [K, r]``, ``V [r, N]``.

    By Eckart-Young the error is optimal in Frobenius norm:
    ``||W - U V||_F^2 = sum_{i >= r} sigma_i^2``; at ``r = min(K, N)`` the product is W itself."""
    W = _check_rank(W, rank)
    U, V = _truncated_svd(W.astype(np.float64), rank)
    return U.astype(W.dtype), V.astype(W.dtype)


def asvd_factorize(W: np.ndarray, abs_mean: np.ndarray, rank: int, alpha: float = 0.5,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """ASVD (Yuan et al. 2023): activation-aware SVD with input-channel scaling.

    With ``S = diag(abs_mean^alpha)`` (``abs_mean[k] = E|x_k|``), ``W = S^-1 (S W)``; truncate the SVD
    of ``S W ~ U' V`` and fold ``S^-1`` back: ``U = S^-1 U'``. The truncation error of row k is
    weighted by ``S_k``, so channels carrying large activations are kept more faithfully. Zero
    entries of abs_mean (dead channels) are floored at 1e-6 of the largest, to keep S invertible.
    """
    W = _check_rank(W, rank)
    scale = np.asarray(abs_mean, dtype=np.float64)
    if scale.shape != (W.shape[0],):
        raise ShapeMismatchError(f"abs_mean has shape {scale.shape}, expected ({W.shape[0]},) (one per input row of W)")
    scale = np.abs(scale) ** alpha
    top = scale.max() if scale.size else 0.0
    scale = np.maximum(scale, 1e-6 * top) if top > 0 else np.ones_like(scale)
    U, V = _truncated_svd(scale[:, None] * W.astype(np.float64), rank)
    return (U / scale[:, None]).astype(W.dtype), V.astype(W.dtype)


def damped_cholesky(hessian: np.ndarray, damp: float = 1e-4) -> np.ndarray:
    """Lower Cholesky factor L of ``H + lambda I`` (``H = L L^T``), ``lambda = damp * mean(diag H)``.

    A calibration Hessian is often singular (fewer tokens than channels, dead channels); the
    damping makes it positive definite and is raised tenfold (up to 6 times) if needed. An
    all-zero H (no calibration signal) falls back to the identity, i.e. plain SVD."""
    H = np.asarray(hessian, dtype=np.float64)
    K = H.shape[0]
    mean_diag = float(np.mean(np.diag(H))) if K else 0.0
    if not mean_diag > 0.0:
        return np.eye(K)
    lam = damp * mean_diag
    for _ in range(7):
        try:
            return scipy.linalg.cholesky(H + lam * np.eye(K), lower=True)
        except (np.linalg.LinAlgError, ValueError):
            lam *= 10.0
    raise CompressionSettingError(
        f"the calibration Hessian ({K}x{K}) is not positive definite even with damping {lam:.3g}",
        hint="check the calibration statistics for NaN/inf values")


def whitened_factorize(W: np.ndarray, hessian: np.ndarray, rank: int, *, damp: float = 1e-4,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """SVD-LLM (Wang et al. 2024): truncation-aware whitening, optimal for the output error.

    With ``H = X^T X / M = L L^T`` (Cholesky), for any approximation ``W_hat``::

        ||X W - X W_hat||_F^2 = M tr((W - W_hat)^T H (W - W_hat)) = M ||L^T (W - W_hat)||_F^2

    so the best rank-r ``W_hat`` is ``L^-T`` times the truncated SVD of ``L^T W``: ``L^T W ~ U' V``
    and ``U = L^-T U'`` (a triangular solve). The discarded singular values of ``L^T W`` are exactly
    the output error. ``H`` is damped by ``damp * mean(diag H)`` (see :func:`damped_cholesky`).
    """
    W = _check_rank(W, rank)
    K = W.shape[0]
    H = np.asarray(hessian, dtype=np.float64)
    if H.shape != (K, K):
        raise ShapeMismatchError(f"hessian has shape {H.shape}, expected ({K}, {K}) for a weight with K={K} rows")
    L = damped_cholesky(H, damp)
    Uw, V = _truncated_svd(L.T @ W.astype(np.float64), rank)
    U = scipy.linalg.solve_triangular(L.T, Uw, lower=False)
    return U.astype(W.dtype), V.astype(W.dtype)

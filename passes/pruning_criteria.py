"""The numerical core of weight pruning for linear layers: which weights to drop, and how to fix
up the survivors.

Convention (as everywhere in slimgraph's IR): a linear layer's weight ``W`` has shape ``[K, N]``
with K the reduction (input) axis, ``y = x @ W``. Column ``n`` of ``W`` produces output ``n`` (it
is *row* n of torch's ``[out, in]`` weight). Calibration statistics:

* ``hessian`` ``H = mean_t x_t x_t^T`` (``[K, K]``, float64) over calibration tokens; the output
  error of a weight change ``D`` is ``E||x D||^2 = tr(D^T H D)``;
* per-input-channel norms ``||X_k|| ~ sqrt(H_kk)`` (up to the token count, which cancels).

Masks are boolean *keep*-masks (True = weight survives). Unstructured masks prune exactly
``floor(sparsity * K)`` weights in every output column (selection is per output, as in Wanda).
An ``n_m=(n, m)`` pattern keeps the ``n`` largest of every ``m`` consecutive K entries of each column
(2:4 = the sparse tensor core format); it replaces ``sparsity`` (the result is ``1 - n/m`` sparse).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from slimgraph.compiler.errors import CompressionOptionError, ShapeMismatchError


class CompressionSettingError(CompressionOptionError, ValueError):
    """A pruning / low-rank setting is out of range (sparsity, N:M pattern, rank, energy, ...).

    A :class:`CompressionOptionError` (usage error, SG-106) that is also a ``ValueError``, so plain
    numeric callers can catch it the usual way."""


# ----------------------------------------------------------------------------- validation
def check_sparsity(sparsity: float) -> float:
    """``sparsity`` is the fraction of weights removed; 1.0 would delete the layer."""
    if not (isinstance(sparsity, (int, float, np.floating)) and 0.0 <= float(sparsity) < 1.0):
        raise CompressionSettingError(
            f"sparsity must be in [0, 1) (the fraction of weights removed), got {sparsity!r}",
            hint="e.g. 0.5 removes half of every output column's weights")
    return float(sparsity)


def check_n_m(n_m, K: int) -> tuple[int, int]:
    """``(n, m)``: keep n of every m consecutive input rows; needs ``0 < n < m`` and ``m | K``."""
    try:
        n, m = (int(v) for v in n_m)
    except (TypeError, ValueError):
        raise CompressionSettingError(f"n_m must be a pair (n, m) such as (2, 4), got {n_m!r}") from None
    if not 0 < n < m:
        raise CompressionSettingError(f"N:M pattern {n}:{m} needs 0 < n < m (keep n of every m weights)")
    if K % m:
        raise CompressionSettingError(
            f"N:M pattern {n}:{m} needs the input size K={K} to be a multiple of m={m}")
    return n, m


def _check_weight(W: np.ndarray) -> np.ndarray:
    W = np.asarray(W)
    if W.ndim != 2:
        raise ShapeMismatchError(f"a linear weight must be 2-D [K, N], got shape {W.shape}")
    return W


def _check_hessian(hessian: np.ndarray, K: int) -> np.ndarray:
    H = np.asarray(hessian, dtype=np.float64)
    if H.shape != (K, K):
        raise ShapeMismatchError(f"hessian has shape {H.shape}, expected ({K}, {K}) for a weight with K={K} rows")
    return H


def pruned_per_column(K: int, sparsity: float) -> int:
    """Number of weights removed from each output column: ``floor(sparsity * K)`` (robust to
    float noise such as 0.29 * 100 = 28.999...)."""
    return int(math.floor(sparsity * K + 1e-9))


# ----------------------------------------------------------------------------- mask selection
def _mask_lowest(score: np.ndarray, count: int) -> np.ndarray:
    """Keep-mask that drops the ``count`` lowest scores of every column (stable ties: lower k first)."""
    keep = np.ones(score.shape, dtype=bool)
    if count > 0:
        drop = np.argsort(score, axis=0, kind="stable")[:count]
        np.put_along_axis(keep, drop, False, axis=0)
    return keep


def _mask_n_m(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask with the ``n`` highest scores of each group of ``m`` consecutive rows per column."""
    K, N = score.shape
    groups = score.reshape(K // m, m, N)
    keep = np.ones(groups.shape, dtype=bool)
    drop = np.argsort(groups, axis=1, kind="stable")[:, : m - n]
    np.put_along_axis(keep, drop, False, axis=1)
    return keep.reshape(K, N)


def mask_from_scores(score: np.ndarray, sparsity: float, n_m=None) -> np.ndarray:
    """Turn importance scores ``[K, N]`` into a keep-mask, per output column (or N:M)."""
    K = score.shape[0]
    if n_m is not None:
        return _mask_n_m(score, *check_n_m(n_m, K))
    return _mask_lowest(score, pruned_per_column(K, check_sparsity(sparsity)))


def input_norms(hessian: np.ndarray) -> np.ndarray:
    """Per-input-channel activation norms ``||X_k|| ~ sqrt(H_kk)`` (token-count scale dropped)."""
    return np.sqrt(np.maximum(np.diag(hessian), 0.0))


def magnitude_mask(W: np.ndarray, sparsity: float, *, n_m=None) -> np.ndarray:
    """Keep the largest ``|W_kn|`` of each output column n (or of each N:M group)."""
    W = _check_weight(W)
    return mask_from_scores(np.abs(W), sparsity, n_m)


def wanda_mask(W: np.ndarray, hessian: np.ndarray, sparsity: float, *, n_m=None) -> np.ndarray:
    """Wanda (Sun et al. 2023): score ``|W_kn| * ||X_k||``, compared within each output column.

    A weight's score is the typical size of its term ``x_k W_kn`` in output n, so small weights on
    high-energy input channels (outlier features) survive where magnitude pruning drops them."""
    W = _check_weight(W)
    norms = input_norms(_check_hessian(hessian, W.shape[0]))
    return mask_from_scores(np.abs(W) * norms[:, None], sparsity, n_m)


# ----------------------------------------------------------------------------- SparseGPT
def _inverse_hessian_cholesky(H: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1 = U^T U``, ``lambda = damp * mean(diag H)``.

    Row k of U holds, for the OBS problem restricted to inputs ``k..K-1``, the inverse-Hessian row
    ``Hinv[k, k:] / sqrt(Hinv[k, k])``: the optimal compensation of the later rows when row k
    changes. Damping is raised tenfold (up to 5 times) if the matrix is still not positive definite."""
    lam = damp * float(np.mean(np.diag(H)))
    K = H.shape[0]
    for _ in range(6):
        try:
            lower = scipy.linalg.cholesky(H + lam * np.eye(K), lower=True)
            inverse = scipy.linalg.cho_solve((lower, True), np.eye(K))
            return scipy.linalg.cholesky(inverse, lower=False)
        except (np.linalg.LinAlgError, ValueError):
            lam = max(lam * 10.0, 1e-8)
    raise CompressionSettingError(
        f"the calibration Hessian ({K}x{K}) is not positive definite even with damping {lam:.3g}",
        hint="collect more calibration tokens or raise damp")


def _block_keep(W1: np.ndarray, d: np.ndarray, drop_before: int, drop_after: int) -> np.ndarray:
    """Adaptive unstructured selection inside one block: per column, drop the rows with the lowest
    OBS saliency ``w^2 / [U_kk]^2`` (the output error of zeroing w, given later rows compensate).
    The count per block makes the cumulative count exact: ``floor(s*i2) - floor(s*i1)``."""
    return _mask_lowest(W1**2 / (d[:, None] ** 2), drop_after - drop_before)


def sparsegpt_prune(W: np.ndarray, hessian: np.ndarray, sparsity: float, *, n_m=None,
                    damp: float = 0.01, block_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT (Frantar & Alistarh 2023): prune and reconstruct a layer to keep ``x @ W``.

    Rows (inputs) are visited in order k = 0..K-1 for all N columns at once. With ``U`` the upper
    Cholesky factor of ``H^-1``, removing weight ``w = W[k, n]`` (``q = 0``) and updating the
    not-yet-visited rows by ``W[k:, n] -= U[k, k:] * (w - q) / U[k, k]`` is the optimal (OBS) fix:
    it minimises ``tr(D^T H D)`` given the frozen rows ``< k``. The mask is chosen adaptively, one
    block of ``block_size`` rows at a time, from the already-updated weights by the saliency
    ``w^2 / U_kk^2`` (per column: exactly ``floor(sparsity*K)`` per output column overall); an N:M
    pattern picks ``m - n`` rows to drop in every group of m, at the group's first row. Updates
    inside a block are applied row by row; the block's accumulated errors reach the later rows in
    one matrix product (lazy batch updates, as GPTQ).

    Dead inputs (``H_kk == 0``: never active) get ``H_kk = 1`` and weight 0, as in GPTQ; they
    are then the cheapest to prune. Returns ``(W_pruned, keep_mask)`` with W_pruned in W's dtype
    and exactly zero wherever the mask is False.
    """
    W = _check_weight(W)
    K, N = W.shape
    H = _check_hessian(hessian, K).copy()
    if n_m is not None:
        n_m = check_n_m(n_m, K)
    else:
        sparsity = check_sparsity(sparsity)
    if block_size < 1:
        raise CompressionSettingError(f"block_size must be >= 1, got {block_size}")
    if n_m is not None and block_size % n_m[1]:
        block_size = max(n_m[1], block_size - block_size % n_m[1])
    work = W.astype(np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    work[dead, :] = 0.0
    U = _inverse_hessian_cholesky(H, damp)
    keep = np.ones((K, N), dtype=bool)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        errors = _prune_block(work, U, keep, i1, i2, sparsity, n_m)
        work[i2:] -= U[i1:i2, i2:].T @ errors
    work[~keep] = 0.0
    return work.astype(W.dtype, copy=False), keep


def _prune_block(work, U, keep, i1, i2, sparsity, n_m) -> np.ndarray:
    """OBS-prune rows ``i1..i2`` of ``work`` in place (also filling ``keep``); returns the scaled
    errors ``(w - q) / U_kk`` of the block (``[i2 - i1, N]``) for the lazy update of later rows."""
    W1 = work[i1:i2]
    U1 = U[i1:i2, i1:i2]
    d = np.diag(U1)
    if n_m is None:
        keep1 = _block_keep(W1, d, pruned_per_column(i1, sparsity), pruned_per_column(i2, sparsity))
    else:
        keep1 = np.ones(W1.shape, dtype=bool)
    errors = np.zeros_like(W1)
    n, m = n_m if n_m is not None else (0, 0)
    for i in range(i2 - i1):
        if n_m is not None and i % m == 0:
            keep1[i:i + m] = _mask_n_m(W1[i:i + m] ** 2 / d[i:i + m, None] ** 2, n, m)
        w = W1[i]
        err = np.where(keep1[i], 0.0, w) / d[i]
        W1[i:] -= U1[i, i:, None] * err[None, :]
        errors[i] = err
    keep[i1:i2] = keep1
    return errors


# ----------------------------------------------------------------------------- structured
def neuron_importance(W_in: list[np.ndarray], W_out: np.ndarray, act_sq_norm: np.ndarray | None = None,
                      ) -> np.ndarray:
    """Importance ``[F]`` of the F intermediate channels of an FFN (or any in -> F -> out block),
    for removing whole neurons: column f of every ``W_in[i]`` ``[K, F]`` and row f of ``W_out``
    ``[F, N]``.

    With calibration statistics ``act_sq_norm[f] = E[h_f^2]`` of the intermediate activation h (after
    the nonlinearity / gate product, i.e. the input of W_out), the score is the RMS of neuron f's
    contribution ``h_f * W_out[f, :]`` to the output::

        score_f = sqrt(E ||h_f W_out[f, :]||^2) = sqrt(E[h_f^2]) * ||W_out[f, :]||_2

    exactly the output error of deleting that neuron alone. Without statistics, a weight-only proxy
    replaces ``sqrt(E h_f^2)`` by the product of the neuron's input-column norms (h_f scales with
    each ``||W_in[i][:, f]||`` for unit-scale inputs; for gate * up both factors enter)::

        score_f = ||W_out[f, :]||_2 * prod_i ||W_in[i][:, f]||_2

    A neuron with a zero output row scores 0 either way. Lowest scores are pruned first.
    """
    W_out = _check_weight(W_out)
    F = W_out.shape[0]
    out_norm = np.linalg.norm(W_out.astype(np.float64), axis=1)
    if act_sq_norm is not None:
        act = np.asarray(act_sq_norm, dtype=np.float64)
        if act.shape != (F,):
            raise ShapeMismatchError(f"act_sq_norm has shape {act.shape}, expected ({F},) (one per neuron of W_out)")
        return out_norm * np.sqrt(np.maximum(act, 0.0))
    score = out_norm
    for i, w in enumerate(W_in):
        w = _check_weight(w)
        if w.shape[1] != F:
            raise ShapeMismatchError(
                f"W_in[{i}] has shape {w.shape}: expected {F} columns to match W_out {W_out.shape}")
        score = score * np.linalg.norm(w.astype(np.float64), axis=0)
    return score

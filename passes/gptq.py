"""GPTQ weight quantization (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), in numpy, for slimgraph's ``[K, N]`` weights (``y = x @ W``).

Objective. For calibration inputs ``X [T, K]`` GPTQ minimises the layer's output error
``||X W - X W_hat||_F^2 = sum_n (w_n - w_hat_n)^T H' (w_n - w_hat_n)`` with ``H' = X^T X``; we take
``H = H' / T`` (the mean of ``x x^T``; the scale does not matter). Output columns ``n`` are
independent and share H, so every step below is vectorised over N.

Optimal Brain Surgeon sweep. Rows of K are quantized one at a time. After quantizing row ``k`` to
``q_k`` with error ``e = (w_k - q_k) / [H^-1]_kk``, the remaining rows ``j > k`` absorb it,
``w_j -= e * [H^-1]_kj``, which is the least-squares optimal compensation. GPTQ's trick: with
``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), row k of U already holds
``[H^-1]_k,k: / sqrt([H^-1]_kk)`` of the inverse Hessian *with rows < k eliminated*, so the update
is ``err = (w_k - q_k) / U_kk``; ``W[k+1:] -= outer(U[k, k+1:], err)``.

Lazy batches. The updates of a block of rows on all later rows are deferred and applied as one
matrix product ``W[later] -= U[block, later]^T @ Err[block]``. We apply the same idea recursively
inside each block (halving it down to a few rows), so almost all flops are BLAS matrix products.

Details: damping adds ``damp * mean(diag H)`` to the diagonal (retried x10 if Cholesky fails);
inputs that never fire (``H_kk = 0``) get ``H_kk = 1`` and their weight row is set to 0.
``act_order`` processes rows in order of decreasing ``H_kk`` (most salient first). With groups it
uses *static* groups: every group's scale/zero comes from the (dead-row cleaned) original W up
front, so the stored layout keeps contiguous groups and needs no permutation index. Without
act_order a group's params are computed when the sweep reaches its first row, from the rows as
updated by the errors of earlier groups (the standard GPTQ scheme). Codes come back in the
original row order.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from slimgraph.passes.quant_format import SCALE_DTYPE, QuantizedMatrix, QuantSpec
from slimgraph.passes.quantizers import check_weight, group_params, quantize_rows

_LEAF_ROWS = 8           # rows handled by rank-1 updates at the bottom of the recursion
_COLUMN_CHUNK = 8192     # output columns processed together (keeps the working set in cache)
_DAMP_RETRIES = 4


def _check_hessian(hessian: np.ndarray, rows: int) -> np.ndarray:
    H = np.array(hessian, dtype=np.float64)
    if H.shape != (rows, rows):
        raise ValueError(f"hessian has shape {H.shape}, expected ({rows}, {rows}) for K={rows}")
    if not np.isfinite(H).all():
        raise ValueError("hessian contains NaN/inf values; the calibration activations are "
                         "not finite")
    return H


def _drop_dead_inputs(W: np.ndarray, H: np.ndarray):
    """Inputs with ``H_kk = 0`` never fire: zero their weight row and set ``H_kk = 1``."""
    dead = np.diag(H) == 0
    if dead.any():
        W = W.copy()
        W[dead] = 0.0
        H[dead, dead] = 1.0
    return W, H


def inverse_hessian_cholesky(H: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of ``(H + damp * mean(diag H) * I)^-1`` as float32.

    Retries with 10x the damping a few times when H is not positive definite.
    """
    mean_diag = float(np.mean(np.diag(H)))
    identity = np.eye(H.shape[0])
    for attempt in range(_DAMP_RETRIES):
        damped = H + (damp * 10 ** attempt) * mean_diag * identity
        try:
            lower = scipy.linalg.cholesky(damped, lower=True)
            inverse = scipy.linalg.cho_solve((lower, True), identity)
            return scipy.linalg.cholesky(inverse, lower=False).astype(np.float32)
        except np.linalg.LinAlgError:
            continue
    raise ValueError(f"hessian is not positive definite even with damping "
                     f"{damp * 10 ** (_DAMP_RETRIES - 1):g} x mean(diag H)")


class _Sweep:
    """State of the GPTQ sweep over one chunk of output columns (rows already in sweep order).

    ``group_of[j]`` is the group of sweep row j; ``scales``/``zeros`` ``[n_groups, n]`` are either
    precomputed (static) or filled when the sweep reaches a group's first row (dynamic).
    """

    def __init__(self, W, U, spec, group_of, scales, zeros, dynamic_group):
        self.W, self.U, self.spec = W, U, spec
        self.group_of, self.scales, self.zeros = group_of, scales, zeros
        self.dynamic_group = dynamic_group            # group length, or 0 for static params
        self.err = np.zeros_like(W)
        self.codes = np.zeros(W.shape, np.uint8)

    def run(self, block_size: int):
        rows, g = self.W.shape[0], self.dynamic_group
        if g:   # blocks must start on group boundaries (see _split)
            block_size = -(-block_size // g) * g
        for start in range(0, rows, block_size):
            stop = min(start + block_size, rows)
            self._recurse(start, stop)
            self._propagate(start, stop, stop, rows)

    def _propagate(self, lo, hi, dst_lo, dst_hi):
        """Apply the deferred errors of rows [lo, hi) to rows [dst_lo, dst_hi)."""
        if dst_lo < dst_hi:
            self.W[dst_lo:dst_hi] -= self.U[lo:hi, dst_lo:dst_hi].T @ self.err[lo:hi]

    def _recurse(self, lo, hi):
        """Quantize rows [lo, hi), which already hold every update from rows < lo."""
        spans_groups = self.dynamic_group and hi - lo > self.dynamic_group
        if hi - lo <= _LEAF_ROWS and not spans_groups:
            self._leaf(lo, hi)
            return
        mid = self._split(lo, hi)
        self._recurse(lo, mid)
        self._propagate(lo, mid, mid, hi)
        self._recurse(mid, hi)

    def _split(self, lo, hi):
        """Midpoint; with dynamic groups, split on a group boundary while the range spans groups,
        so that a group's rows are all up to date when its params are computed."""
        g = self.dynamic_group
        if g and hi - lo > g:
            return lo + g * max(1, (hi - lo) // (2 * g))
        return lo + (hi - lo) // 2

    def _leaf(self, lo, hi):
        W, U = self.W, self.U
        for j in range(lo, hi):
            group = self.group_of[j]
            if self.dynamic_group and j % self.dynamic_group == 0:
                self._fill_group_params(j, group)
            z = None if self.zeros is None else self.zeros[group]
            q = quantize_rows(W[j], self.scales[group], z, self.spec)
            self.codes[j] = q
            zero = self.spec.symmetric_zero if z is None else z.astype(np.float32)
            w_hat = (q.astype(np.float32) - zero) * self.scales[group].astype(np.float32)
            err = (W[j] - w_hat) / U[j, j]
            self.err[j] = err
            if j + 1 < hi:
                W[j + 1:hi] -= np.outer(U[j, j + 1:hi], err)

    def _fill_group_params(self, first_row, group):
        rows = self.W[first_row:first_row + self.dynamic_group]
        scales, zeros = group_params(rows, self.spec)
        self.scales[group] = scales
        if zeros is not None:
            self.zeros[group] = zeros


def _empty_params(n_groups, cols, spec):
    scales = np.ones((n_groups, cols), SCALE_DTYPE)
    return scales, None if spec.symmetric else np.zeros((n_groups, cols), SCALE_DTYPE)


def gptq_quantize(W: np.ndarray, hessian: np.ndarray, spec: QuantSpec, *, damp: float = 0.01,
                  act_order: bool = True, block_size: int = 128) -> QuantizedMatrix:
    """GPTQ-quantize ``W [K, N]`` given ``hessian [K, K]`` = mean of ``x x^T`` over calibration
    tokens. Returns codes in the original row order with contiguous groups (see module docs).

    Raises ValueError for a non-multiple K, NaN/inf in W or H, or an H that stays indefinite.
    """
    W = check_weight(W, spec)
    rows, cols = W.shape
    W, H = _drop_dead_inputs(W, _check_hessian(hessian, rows))
    group = spec.group_for(rows)
    n_groups = rows // group
    static = act_order or n_groups == 1
    if static:
        scales, zeros = group_params(W.reshape(n_groups, group, cols), spec)
    else:
        scales, zeros = _empty_params(n_groups, cols, spec)
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(rows)
    U = inverse_hessian_cholesky(H[np.ix_(order, order)], damp)
    codes = np.empty((rows, cols), np.uint8)
    for c0 in range(0, cols, _COLUMN_CHUNK):
        cs = slice(c0, min(c0 + _COLUMN_CHUNK, cols))
        sweep = _Sweep(np.ascontiguousarray(W[order, cs]), U, spec, order // group,
                       scales[:, cs], None if zeros is None else zeros[:, cs],
                       0 if static else group)
        sweep.run(max(1, block_size))
        codes[order, cs] = sweep.codes
    return QuantizedMatrix(codes, scales, zeros, spec)

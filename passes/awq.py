"""Activation-aware weight quantization (AWQ; Lin et al., 2023), in numpy.

Several weights ``W_i [K, N_i]`` that read the same input ``x [*, K]`` (e.g. q/k/v, or gate/up)
share one per-input-channel scale ``s [K]``. Because ``x @ W = (x / s) @ (s[:, None] * W)``, we
may quantize ``s * W`` instead of W: scaling up the rows that meet large activations shrinks
their *relative* rounding error exactly where it is amplified the most.

Scale search. With ``a = mean_t |x_t|`` per channel, ``s(alpha) = a**alpha`` normalised by
``sqrt(max(s) * min(s))`` (as the reference implementation does); alpha runs over the grid
``0, 1/grid, ..., (grid-1)/grid`` and we keep the alpha minimising the calibration objective
``L(alpha) = sum_i ||x W_i - (x / s) Q(s W_i)||_F^2`` with Q the RTN quantizer. ``alpha = 0``
gives ``s = 1``, i.e. plain RTN, and it is always on the grid, so the chosen scale is never worse
than RTN on that objective.

Clip search (AWQ's ``auto_clip``). For each (group, output column) of ``s * W`` we also try
shrinking the group's [min, max] range by factors in [0.5, 1], keeping the factor minimising the
group's partial-output error ``||(x / s)_g (w_g - Q(w_g))||^2`` (factor 1 = no clipping). Group
errors ignore cross terms, so every column's total error is finally compared with the unclipped
one and the better of the two kept: clipping can only lower the objective.

Peak rows. A uniform sample of tokens almost never holds the rare tokens with massive activations
(hundreds of times the typical |x|, e.g. the first token of a window, on which attention leans):
clipping a range tuned on typical rows can multiply their error (SmolLM2's last down_proj: x2 on
its first token). With ``peak_rows`` (the calibration rows of largest max |x|), the search runs on
sample and peak rows together, and a column keeps its clipped range only if that lowers the error
on the sample *and* does not raise it on the peak rows.

Result. ``AwqResult.matrices[i]`` holds ``Q(s * W_i)``; the caller must divide the activation by
``input_scale`` (``x / s``, usually folded into the preceding norm's weight) before the matmul.

Bounded work: the alpha search uses at most ``_SEARCH_ROWS`` (512) calibration rows and at most
``_SEARCH_COLUMNS`` (2048) columns per weight; clip search and its per-column check use the rows
that keep ``rows * K * N <= _CLIP_BUDGET`` (all 512 for K * N up to 576 * 1536, at least 64).
The "never worse" guarantees hold exactly on those samples, i.e. on the whole calibration set
when it and the weights are within the limits; beyond them they hold on the subsample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from slimgraph.passes.quant_format import QuantizedMatrix, QuantSpec
from slimgraph.passes.quantizers import (check_weight, group_params, params_from_range,
                                         quantize_rtn, quantize_with_params)

_SEARCH_ROWS = 512
_SEARCH_COLUMNS = 2048
_CLIP_BUDGET = 512 * 576 * 1536      # multiply-adds per candidate factor
_CLIP_MIN_ROWS = 64
_CLIP_COLUMNS = 2048
_CLIP_FACTORS = np.linspace(1.0, 0.5, 11)


@dataclass(frozen=True)
class AwqResult:
    """``input_scale [K]`` (divide x by it) and ``Q(input_scale[:, None] * W_i)`` per weight."""

    input_scale: np.ndarray
    matrices: list[QuantizedMatrix]


def _sample(count: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` of ``count`` items (all of them when they fit)."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))


def scale_for(alpha: float, act_mean: np.ndarray) -> np.ndarray:
    """``s = act_mean**alpha`` (floored at 1e-4), divided by ``sqrt(max(s) * min(s))``."""
    s = np.maximum(act_mean.astype(np.float64) ** alpha, 1e-4)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def output_error(x: np.ndarray, W: np.ndarray, W_hat_scaled: np.ndarray,
                 s: np.ndarray) -> np.ndarray:
    """Per-column ``||x W - (x / s) W_hat_scaled||^2`` (W_hat_scaled approximates ``s * W``),
    computed as ``(x / s) (s W - W_hat_scaled)``."""
    diff = (x / s) @ (s[:, None] * W - W_hat_scaled)
    return np.einsum("mn,mn->n", diff, diff, dtype=np.float64)


def fake_quantize_with(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                       spec: QuantSpec) -> np.ndarray:
    """``(clip(rint(w / s + z), 0, M) - z) * s`` in float32, params broadcast against w: the
    same arithmetic as quantize-then-dequantize, without building uint8 codes."""
    s = scales.astype(np.float32)
    z = np.float32(spec.symmetric_zero) if zeros is None else zeros.astype(np.float32)
    q = np.rint(w / s + z)
    np.clip(q, 0, spec.max_code, out=q)
    q -= z
    q *= s
    return q


def fake_quantize(W: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``quantize_rtn(W, spec).dequantize()`` (bit-identical) without building codes."""
    rows, cols = W.shape
    group = spec.group_for(rows)
    w = W.reshape(rows // group, group, cols)
    scales, zeros = group_params(w, spec)
    z = None if zeros is None else zeros[:, None, :]
    return fake_quantize_with(w, scales[:, None, :], z, spec).reshape(rows, cols)


def _search_alpha(weights, x, act_mean, spec, grid):
    """The alpha on the grid (alpha=0 included) minimising the summed output error."""
    cols = [W[:, _sample(W.shape[1], _SEARCH_COLUMNS, 1)] for W in weights]
    losses = []
    for alpha in np.arange(grid) / grid:
        s = scale_for(alpha, act_mean)
        losses.append(sum(output_error(x, W, fake_quantize(s[:, None] * W, spec), s).sum()
                          for W in cols))
    return float(np.argmin(losses)) / grid


def _clip_errors(w: np.ndarray, x: np.ndarray, scales: np.ndarray, zeros, spec) -> np.ndarray:
    """Errors ``[F, N]`` of one group ``w [g, N]`` (inputs ``x [M, g]``) under F candidate params
    ``[F, N]``: one matrix product over all candidates side by side."""
    z = None if zeros is None else zeros[:, None, :]
    diffs = w[None] - fake_quantize_with(w[None], scales[:, None, :], z, spec)     # [F, g, N]
    n_cand, group, cols = diffs.shape
    out = x @ diffs.transpose(1, 0, 2).reshape(group, n_cand * cols)             # [M, F*N]
    return np.einsum("mk,mk->k", out, out).reshape(n_cand, cols)


def _clip_params(scaled: np.ndarray, x_scaled: np.ndarray, spec: QuantSpec):
    """Per (group, column) params from the shrink factor minimising the group's output error."""
    rows, cols = scaled.shape
    group = spec.group_for(rows)
    w = scaled.reshape(rows // group, group, cols)                                # [G, g, N]
    lo, hi = w.min(axis=1), w.max(axis=1)
    candidates = [params_from_range(lo * f, hi * f, spec) for f in _CLIP_FACTORS]
    scales = np.stack([c[0] for c in candidates])                                 # [F, G, N]
    zeros = None if spec.symmetric else np.stack([c[1] for c in candidates])
    errors = np.empty(scales.shape)
    for g in range(rows // group):
        for c0 in range(0, cols, _CLIP_COLUMNS):
            cs = slice(c0, c0 + _CLIP_COLUMNS)
            z = None if zeros is None else zeros[:, g, cs]
            x_group = x_scaled[:, g * group:(g + 1) * group]
            errors[:, g, cs] = _clip_errors(w[g, :, cs], x_group, scales[:, g, cs], z, spec)
    best = errors.argmin(axis=0)[None]       # ties -> factor 1.0 (no clipping) comes first
    pick = lambda a: np.take_along_axis(a, best, axis=0)[0]   # noqa: E731
    return pick(scales), None if zeros is None else pick(zeros)


def _clip_rows(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The calibration rows used to pick and check clipping for W (all when W is small)."""
    rows = int(_CLIP_BUDGET // W.size)
    return x[_sample(x.shape[0], max(_CLIP_MIN_ROWS, rows), 2)]


def _quantize_scaled(W, s, x, peaks, spec, clip_search):
    """``Q(s * W)``; with clip search, per column the clipped params where they lower the error
    on the sample rows ``x`` without raising it on the ``peaks`` rows, else the plain ones."""
    scaled = s[:, None] * W
    plain = quantize_rtn(scaled, spec)
    if not clip_search:
        return plain
    x = _clip_rows(x, W)
    scales, zeros = _clip_params(scaled, np.concatenate([x, peaks]) / s, spec)
    codes = quantize_with_params(scaled, scales, zeros, spec)
    clipped = QuantizedMatrix(codes, scales, zeros, spec)
    errors = lambda rows, q: output_error(rows, W, q.dequantize(), s)   # noqa: E731
    keep = errors(x, clipped) < errors(x, plain)
    if len(peaks):
        keep &= errors(peaks, clipped) <= errors(peaks, plain)
    pick = lambda a, b: None if a is None else np.where(keep, a, b)   # noqa: E731
    return QuantizedMatrix(pick(clipped.codes, plain.codes), pick(scales, plain.scales),
                           pick(zeros, plain.zeros), spec)


def _check_inputs(weights, x_sample, spec):
    if not weights:
        raise ValueError("awq_quantize needs at least one weight")
    weights = [check_weight(W, spec, f"weight {i}") for i, W in enumerate(weights)]
    rows = weights[0].shape[0]
    if any(W.shape[0] != rows for W in weights):
        raise ValueError(f"weights sharing one input must have the same K, got "
                         f"{[W.shape[0] for W in weights]}")
    x = _check_rows(x_sample, rows)
    if x.shape[0] == 0:
        raise ValueError(f"x_sample must be [M, {rows}] with M >= 1, got shape {x.shape}")
    return weights, x


def _check_rows(rows: np.ndarray, k: int) -> np.ndarray:
    x = np.asarray(rows, np.float32)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"calibration rows must be [M, {k}], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("calibration activations contain NaN/inf values")
    return x


def awq_quantize(weights: list[np.ndarray], x_sample: np.ndarray, spec: QuantSpec, *,
                 grid: int = 20, clip_search: bool | Sequence[bool] = True,
                 peak_rows: np.ndarray | None = None) -> AwqResult:
    """AWQ for weights ``[K, N_i]`` sharing one input; ``x_sample [M, K]`` are calibration rows,
    ``peak_rows [P, K]`` the rows of largest activations (clipping must not harm them).

    ``clip_search`` is one flag for all weights or one per weight (queries and keys go without it).
    Returns the input scale s and ``Q(s * W_i)``; the caller divides x by s. Raises ValueError
    for NaN/inf, mismatched K, or K not a multiple of the group size.
    """
    weights, x = _check_inputs(weights, x_sample, spec)
    clips = [clip_search] * len(weights) if isinstance(clip_search, bool) else list(clip_search)
    if len(clips) != len(weights):
        raise ValueError(f"clip_search has {len(clips)} flags for {len(weights)} weights")
    act_mean = np.abs(x).mean(axis=0)
    x = x[_sample(x.shape[0], _SEARCH_ROWS, 0)]
    alpha = _search_alpha(weights, x, act_mean, spec, max(1, grid))
    s = scale_for(alpha, act_mean)
    peaks = np.zeros((0, x.shape[1]), np.float32) if peak_rows is None else _check_rows(peak_rows, x.shape[1])
    matrices = [_quantize_scaled(W, s, x, peaks, spec, clip) for W, clip in zip(weights, clips)]
    return AwqResult(s, matrices)

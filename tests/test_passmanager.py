"""The pass registry and run_pipeline: records, --dump-ir, --print-after, --verify and events."""

from __future__ import annotations

import numpy as np
import pytest

from golden_util import causal_attention, layer_norm_primitives, llama_block
from slimgraph.compiler import ops
from slimgraph.compiler.errors import UnknownPassError, VerificationError
from slimgraph.compiler.ir import Function, Module, Node
from slimgraph.compiler.passmanager import (
    DEFAULT_PIPELINE, PassResult, compare_outputs, get_pass, list_passes, make_sample_inputs, register_pass,
    run_pipeline,
)
from slimgraph.compiler.printer import parse_module, print_module
from slimgraph.compiler.verifier import verify


@register_pass("test_flip_sign")
def flip_sign(module: Module) -> PassResult:
    """Test-only broken pass: negates the first output of the entry."""
    fn = module.main
    out = fn.outputs[0]
    node = next(n for n in fn.nodes if n.name == out)
    neg = Node(f"{out}_neg", ops.NEG, (out,), ops.NEG.make_attrs({}), node.type)
    new = Function(fn.name, fn.params, fn.nodes + (neg,), (neg.name,) + fn.outputs[1:], fn.kind)
    return PassResult(module.with_function(new), True, {"flipped": 1})


@register_pass("test_dangling")
def dangling(module: Module) -> PassResult:
    """Test-only broken pass: returns a value that is never defined."""
    fn = module.main
    new = Function(fn.name, fn.params, fn.nodes, ("nowhere",), fn.kind)
    return PassResult(module.with_function(new), True, {})


def test_pass_result_unpacks():
    result, changed, stats = get_pass("dce").run(llama_block(layers=1))
    assert isinstance(result, Module) and changed is False and stats["nodes_removed"] == 0


def test_unknown_pass_lists_known_names():
    with pytest.raises(UnknownPassError) as info:
        get_pass("fold_everything")
    for name in ("fold_constants", "simplify", "cse", "dce", "fuse"):
        assert name in str(info.value)


def test_registry_requires_docstrings_and_lists_passes():
    with pytest.raises(TypeError):
        register_pass("test_nodoc")(lambda module: PassResult(module, False, {}))
    names = [p.name for p in list_passes()]
    assert set(DEFAULT_PIPELINE) <= set(names) and all(p.doc for p in list_passes())


def test_default_pipeline_records_and_keeps_numerics():
    module = llama_block(layers=2)
    before = print_module(module)
    report = run_pipeline(module, verify=True)
    assert print_module(module) == before
    assert [r.name for r in report.records] == list(DEFAULT_PIPELINE)
    first, last = report.records[0], report.records[-1]
    assert last.kernels_after < first.kernels_before
    assert all(r.seconds >= 0 and r.nodes_before >= 0 for r in report.records)
    assert report.changed and report.module.num_kernels() == last.kernels_after
    verify(report.module)


def test_dump_ir_is_numbered_deterministic_and_parses(tmp_path):
    run_pipeline(causal_attention("T"), dump_dir=tmp_path / "a")
    run_pipeline(causal_attention("T"), dump_dir=tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    expected = ["00-input.ir"] + [f"{i:02d}-{name}.ir" for i, name in enumerate(DEFAULT_PIPELINE, start=1)]
    assert names == expected
    for name in names:
        text = (tmp_path / "a" / name).read_bytes()
        assert text == (tmp_path / "b" / name).read_bytes()
        parsed = parse_module(text.decode(), source=name)
        verify(parsed)
        assert print_module(parsed) == text.decode()


def test_print_after_and_events():
    events = []
    report = run_pipeline(layer_norm_primitives(), print_after={"simplify", "fuse"},
                          on_event=lambda kind, payload: events.append((kind, payload)))
    kinds = [k for k, _ in events]
    assert kinds.count("pass_start") == kinds.count("pass_end") == len(DEFAULT_PIPELINE)
    printed = [p for k, p in events if k == "print_after"]
    assert [p["pass"] for p in printed] == ["simplify", "simplify", "fuse"]
    assert printed[-1]["text"] == print_module(run_pipeline(layer_norm_primitives(),
                                                            DEFAULT_PIPELINE[:DEFAULT_PIPELINE.index("fuse") + 1]).module)
    assert events[0] == ("pass_start", {"pass": "fold_constants", "index": 1, "total": len(DEFAULT_PIPELINE)})
    assert report.records[-1].name == "dce"


def test_print_after_unknown_pass_is_a_usage_error():
    with pytest.raises(UnknownPassError):
        run_pipeline(llama_block(layers=1), ("dce",), print_after={"fuse"})


def test_verify_names_the_first_broken_pass():
    with pytest.raises(VerificationError) as info:
        run_pipeline(llama_block(layers=1), ("simplify", "test_flip_sign", "cse", "test_flip_sign"), verify=True)
    assert "pass 'test_flip_sign' (pass 2 of 4) changed output #0 (%probs)" in str(info.value)
    with pytest.raises(VerificationError) as info:
        run_pipeline(llama_block(layers=1), ("fold_constants", "test_dangling"), verify=True)
    assert "'test_dangling'" in str(info.value)


def test_verify_with_given_inputs_and_without_passes_that_break():
    module = causal_attention("T")
    inputs = make_sample_inputs(module, seed=3, symbol_value=4)
    assert inputs["q"].shape == (1, 1, 4, 4)
    run_pipeline(module, verify=True, sample_inputs=inputs)


def test_sample_inputs_are_deterministic_and_in_range():
    module = llama_block(layers=1)
    a, b = make_sample_inputs(module), make_sample_inputs(module)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ids = a["input_ids"]
    assert ids.shape == (1, 7) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < 11


def test_compare_outputs():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 5)).astype(np.float32)
    assert compare_outputs(ref, ref.copy()).ok
    assert compare_outputs(ref, ref + np.float32(1e-6)).ok
    assert not compare_outputs(ref, -ref).ok
    assert not compare_outputs(ref, ref + np.float32(1e-2)).ok
    assert not compare_outputs(ref, ref[:3]).ok
    with_inf = ref.copy()
    with_inf[0, 0] = -np.inf
    assert compare_outputs(with_inf, with_inf.copy()).ok
    assert not compare_outputs(with_inf, ref).ok
    ints = np.arange(6)
    assert compare_outputs(ints, ints.copy()).ok and not compare_outputs(ints, ints[::-1].copy()).ok
    assert compare_outputs(np.zeros(3, np.float32), np.zeros(3, np.float32)).ok

"""Compile with TVM, load the artifact, run it: outputs match PyTorch fp32 for every model.

Criterion for each: cosine >= 0.99999 and max abs error <= 1e-4 * max|reference|, at two values of
the symbolic dim (the artifacts keep T symbolic).
"""

import numpy as np
import pytest
import torch

import slimgraph
from slimgraph.compiler.driver import CompileOptions, compile_model
from slimgraph.models.registry import reference_torch_model
from test_models import SMALL_MODELS, assert_close, inputs_of_length

pytest.importorskip("tvm")


def compiled(name_or_path, tmp_path, **options):
    out = tmp_path / "artifact"
    compile_model(str(name_or_path), out, CompileOptions(**options))
    return slimgraph.load(out)


def check_against_torch(model, reference, example, lengths):
    for i, length in enumerate(lengths):
        inputs = inputs_of_length(example, length, seed=i)
        with torch.no_grad():
            ref = reference(**inputs) if isinstance(inputs, dict) else reference(*inputs)
        if isinstance(inputs, dict):
            got = model(**{k: v.numpy() for k, v in inputs.items()})[0]
        else:
            got = model(*[t.numpy() for t in inputs])[0]
        assert got.shape == tuple(ref.shape)
        assert_close(got, ref.numpy())


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_model_end_to_end(name, tmp_path):
    model = compiled(name, tmp_path)
    reference, example = reference_torch_model(name)
    check_against_torch(model, reference, example, lengths=(5, 11))


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_packaged_model_end_to_end(name, tmp_path):
    from slimgraph.models.registry import resolve_model

    model = compiled(resolve_model(name).path, tmp_path)  # through the HF-folder frontend
    reference, example = reference_torch_model(name)
    check_against_torch(model, reference, example, lengths=(16, 7))


@pytest.mark.realmodel
@pytest.mark.slow
def test_minilm_onnx_end_to_end(tmp_path):
    import onnxruntime as ort

    from slimgraph.compiler.frontends.onnx_export import export_hf_to_onnx
    from slimgraph.models.registry import resolve_model

    onnx_path = tmp_path / "minilm.onnx"
    export_hf_to_onnx(resolve_model("minilm").path, onnx_path)
    model = compiled(onnx_path, tmp_path)
    reference, _ = reference_torch_model("minilm")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for length in (16, 9):
        ids = rng.integers(0, 30000, (1, length)).astype(np.int64)
        mask = np.ones((1, length), np.int64)
        mask[0, -2:] = 0
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        got = model(**{k: feed[k] for k in model.input_names})[0]
        with torch.no_grad():
            ref = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).numpy()
        assert_close(got, ref)
        assert_close(got, session.run(None, feed)[0])

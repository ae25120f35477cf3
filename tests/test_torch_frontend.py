"""PyTorch / Hugging Face frontend: op converters against PyTorch, symbolic dims, and the errors
users see (unsupported ops, NaN weights, unsafe checkpoints, broken model folders)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimgraph.compiler.errors import (
    ModelLoadError, NonFiniteWeightError, UnsafeCheckpointError, UnsupportedOpsError,
)
from slimgraph.compiler.frontends.huggingface import import_hf_folder, load_torch_checkpoint
from slimgraph.compiler.frontends.torch_export import import_exported_program, import_torch_module
from slimgraph.compiler.interpreter import run
from slimgraph.compiler.printer import parse_module, print_module
from slimgraph.compiler.verifier import verify
from slimgraph.models import testmodels


def assert_close(got: np.ndarray, ref: np.ndarray):
    got, ref = np.asarray(got, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    cosine = got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref) + 1e-30)
    assert cosine >= 0.99999
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-7


def check_against_torch(module, make_inputs, dynamic_dims, sizes=(5, 11)):
    """Import once with symbolic dims, then compare at several sizes."""
    imported = import_torch_module(module, make_inputs(7), dynamic_dims=dynamic_dims, source="test")
    verify(imported)
    for n in sizes:
        inputs = make_inputs(n)
        with torch.no_grad():
            ref = module(*inputs)
        got = run(imported, [t.numpy() for t in inputs])[0]
        assert got.shape == tuple(ref.shape)
        if ref.dtype.is_floating_point:
            assert_close(got, ref.numpy())
        else:
            np.testing.assert_array_equal(got, ref.numpy())
    return imported


# ----------------------------------------------------------------------------- attention
class Attention(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, q, k, v):
        if self.mode == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.mode == "bool_mask":
            t = q.shape[-2]
            keep = torch.arange(t).unsqueeze(0) <= torch.arange(t).unsqueeze(1) + 1
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
        if self.mode == "gqa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(q.shape[-2], k.shape[-2]) - 0.5)


@pytest.mark.parametrize("mode", ["causal", "bool_mask", "gqa", "float_mask"])
def test_sdpa_decomposition(mode):
    kv_heads = 2 if mode == "gqa" else 4

    def inputs(t):
        g = torch.Generator().manual_seed(t)
        return (torch.randn(1, 4, t, 8, generator=g), torch.randn(1, kv_heads, t, 8, generator=g),
                torch.randn(1, kv_heads, t, 8, generator=g))

    dims = {name: {2: "T"} for name in ("q", "k", "v")}
    imported = check_against_torch(Attention(mode), inputs, dims)
    assert imported.main.params[0].type.shape == (1, 4, "T", 8)


# ----------------------------------------------------------------------------- shape/index ops
class IndexingOps(torch.nn.Module):
    """Advanced indexing, diff, cumsum over bool, repeat, tril, split/stack, masked_fill, clamp."""

    def forward(self, x, ids):
        rows = torch.arange(x.shape[0])
        picked = x[rows, ids % x.shape[1]]                                       # index.Tensor (2 indices)
        steps = torch.diff(ids, prepend=ids[:1] - 1)                             # diff with prepend
        groups = torch.cumsum(steps != 1, dim=0)                                 # cumsum over bool
        lower = torch.tril(x[:, :3].repeat(1, 2))                                # repeat + tril
        a, b = x.split([2, x.shape[1] - 2], dim=1)
        stacked = torch.stack([a.sum(1), b.amax(1)], dim=1)                      # split + stack
        filled = x.masked_fill(x > 0.5, -1.0).clamp(-0.8, 0.9)
        return picked + groups.float() + stacked.sum(1) + lower.sum(1) + filled.mean(1)


def test_indexing_and_mask_ops():
    def inputs(t):
        g = torch.Generator().manual_seed(t)
        return torch.randn(t, 6, generator=g), torch.randint(0, 10, (t,), generator=g)

    check_against_torch(IndexingOps(), inputs, {"x": {0: "T"}, "ids": {0: "T"}}, sizes=(5, 9))


class SizeArithmetic(torch.nn.Module):
    """Sizes used as numbers: they become dim expressions, not graph nodes."""

    def forward(self, x):
        t = x.shape[1]
        y = x.reshape(x.shape[0], t * 2, x.shape[2] // 2)
        pos = torch.arange(t * 2, dtype=torch.float32) / (t + 1)
        return y + pos[:, None] + y[:, : t + 1].mean()


def test_symbolic_size_arithmetic():
    imported = check_against_torch(SizeArithmetic(), lambda t: (torch.randn(1, t, 4),), {"x": {1: "T"}})
    text = print_module(imported)
    assert "2*T" in text and "sym_size" not in text
    assert imported.main.output_types()[0].shape == (1, "2*T", 2)


def test_import_exported_program_names_dims_and_inputs():
    module = testmodels.MLP().eval()
    ep = torch.export.export(module, (torch.randn(5, 16),), dynamic_shapes=({0: torch.export.Dim("n", min=2)},))
    imported = import_exported_program(ep, source="mlp", input_names=["tokens"], dim_names={"tokens": {0: "T"}})
    assert [p.name for p in imported.main.params] == ["tokens"]
    assert str(imported.main.params[0].type) == "f32[T,16]"
    assert imported.metadata["frontend"] == "torch"


# ----------------------------------------------------------------------------- IR round trip
def test_print_parse_round_trip_of_imported_llama():
    from slimgraph.compiler.frontends.huggingface import import_hf_model

    imported = import_hf_model(testmodels.build_tiny_llama(), source="tiny-llama")
    verify(imported)
    text = print_module(imported)
    assert print_module(parse_module(text)) == text


def test_weights_are_views_of_torch_tensors():
    module, inputs, dims = testmodels.build_mlp()
    imported = import_torch_module(module, inputs, dynamic_dims=dims, source="mlp")
    weight = imported.weights["fc1.weight"].array
    assert np.shares_memory(weight, module.fc1.weight.detach().numpy())


# ----------------------------------------------------------------------------- errors
class TwoUnsupported(torch.nn.Module):
    def forward(self, x):
        return torch.cumprod(x.flip(0), dim=0).flip(1) + torch.cumprod(x, dim=1)


def test_every_unsupported_op_is_listed_with_count():
    with pytest.raises(UnsupportedOpsError) as info:
        import_torch_module(TwoUnsupported(), (torch.randn(3, 4),), dynamic_dims=None, source="two-bad")
    missing = info.value.missing
    assert set(missing) == {"aten.flip.default", "aten.cumprod.default"}
    assert missing["aten.flip.default"][0] == 2 and missing["aten.cumprod.default"][0] == 2
    assert "two-bad" in str(info.value) and "flip" in missing["aten.flip.default"][1]


def test_nan_weight_names_the_tensor():
    module, inputs, dims = testmodels.build_mlp()
    with torch.no_grad():
        module.fc2.weight[3, 1] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=r"fc2\.weight"):
        import_torch_module(module, inputs, dynamic_dims=dims, source="nan-mlp")


class Opaque:
    """Any class: pickling it needs code beyond weights_only."""


def test_unsafe_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "extra": Opaque()}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        load_torch_checkpoint(path)


def test_plain_state_dict_checkpoint_loads(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save(testmodels.MLP().state_dict(), path)
    state = load_torch_checkpoint(path)
    assert state["fc1.weight"].shape == (32, 16)


def test_hf_folder_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        import_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json.*line 1"):
        import_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights and no single PyTorch checkpoint"):
        import_hf_folder(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin: not a readable PyTorch checkpoint"):
        import_hf_folder(tmp_path)


# ----------------------------------------------------------------------------- op coverage
class MathOps(torch.nn.Module):
    """A grab bag of elementwise/reduction ops and their scalar/dtype-promotion variants."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(6, eps=1e-5)
        self.ln = torch.nn.LayerNorm(6, bias=False)

    def forward(self, x, ids):
        a = torch.div(x, 0.7, rounding_mode="floor") + torch.div(x * 3, 2, rounding_mode="trunc")
        b = (1 - x) + 2 ** x.clamp(max=2) + torch.sigmoid(x) * torch.erf(x) - torch.exp(-x.abs()).log1p()
        c = torch.log_softmax(x, -1) + F.relu6(x * 4) + F.hardtanh(x) + self.norm(x) + self.ln(x)
        d = torch.where(x > 0, x, 0.5) + (ids // 3).float()[:, None] + (ids % 4 == 1).float()[:, None]
        values, indices = x.max(dim=1, keepdim=True)
        e = values + indices.float() + x.argmax(-1, keepdim=True).float() + torch.addmm(x[:, :2], x, x.T[:, :2]).sum(1, True)
        g = torch.gather(x, 1, (ids[:, None] % 6).repeat(1, 2)).sum(1, True) + torch.index_select(x, 1, ids[:2] % 6).mean(1, True)
        first, second = torch.chunk(x, 2, dim=1)
        h = torch.cat([torch.stack(torch.unbind(first, dim=1), dim=1) * second, first], 1) + F.pad(x, (1, 1))[:, 1:-1]
        return a + b + c + d + e + g + h


def test_math_ops_against_torch():
    def inputs(t):
        g = torch.Generator().manual_seed(t)
        return torch.randn(t, 6, generator=g), torch.randint(0, 50, (t,), generator=g)

    check_against_torch(MathOps().eval(), inputs, {"x": {0: "T"}, "ids": {0: "T"}}, sizes=(4, 9))


class ConvVariants(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.same = torch.nn.Conv2d(4, 4, (3, 2), padding="same", groups=2, bias=False)
        self.bn = torch.nn.BatchNorm2d(4, affine=False).eval()
        self.bn.running_mean.fill_(0.3)
        self.bn.running_var.fill_(2.0)

    def forward(self, x):
        y = self.bn(self.same(x))
        return F.avg_pool2d(y, 3, stride=1, padding=1) + F.max_pool2d(y, 3, stride=1, padding=1) + F.adaptive_avg_pool2d(y, (3, 4)).mean()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_and_pool_variants():
    check_against_torch(ConvVariants().eval(), lambda n: (torch.randn(n, 4, 6, 8),), {"x": {0: "N"}}, sizes=(1, 3))

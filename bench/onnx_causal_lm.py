"""Export a Hugging Face causal LM folder to ONNX for ONNX Runtime baselines: logits only (no KV cache),
or prefill + decode models carrying transformers' KV cache as inputs and outputs."""

from __future__ import annotations

from pathlib import Path

import torch


def export_causal_lm(folder: str, out_path: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    model.config.use_cache = False

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    example = (torch.ones(1, 16, dtype=torch.long),)
    seq = torch.export.Dim("sequence_length", min=2, max=2048)
    program = torch.onnx.export(Logits(model), example, dynamo=True, input_names=["input_ids"],
                                output_names=["logits"], dynamic_shapes=({1: seq},), optimize=True)
    program.save(str(out_path), external_data=False)
    return out_path


class _CachedStep(torch.nn.Module):
    """One generation step with transformers' own KV cache, as tensors: ``past.N.key/value``
    ``[1, kv_heads, P, head_dim]`` in (absent in prefill), ``logits`` of the last position and
    ``present.N.key/value`` ``[1, kv_heads, P + T, head_dim]`` out (the concatenated cache)."""

    def __init__(self, inner, layers: int):
        super().__init__()
        self.inner, self.layers = inner, layers

    def forward(self, input_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.inner(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def export_causal_lm_with_cache(folder: str, out_dir: Path) -> tuple[Path, Path]:
    """``prefill.onnx`` (input_ids -> logits, present) and ``decode.onnx`` (input_ids [1,1], past ->
    logits, present): the KV-cache deployment of the model for ONNX Runtime."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    names = [f"{p}.{i}.{k}" for p in ("past",) for i in range(layers) for k in ("key", "value")]
    present = [n.replace("past", "present") for n in names]
    out_dir.mkdir(parents=True, exist_ok=True)
    seq = torch.export.Dim("sequence_length", min=2, max=2048)
    prefill = torch.onnx.export(_CachedStep(model, layers), (torch.ones(1, 16, dtype=torch.long),), dynamo=True,
                                input_names=["input_ids"], output_names=["logits", *present],
                                dynamic_shapes=({1: seq},), optimize=True)
    prefill.save(str(out_dir / "prefill.onnx"), external_data=False)
    past_len = torch.export.Dim("past_length", min=2, max=2048)
    past = tuple(torch.zeros(1, kv_heads, 16, head_dim) for _ in names)
    decode = torch.onnx.export(_CachedStep(model, layers), (torch.ones(1, 1, dtype=torch.long), *past), dynamo=True,
                               input_names=["input_ids", *names], output_names=["logits", *present],
                               dynamic_shapes=(None, tuple({2: past_len} for _ in names)), optimize=True)
    decode.save(str(out_dir / "decode.onnx"), external_data=False)
    return out_dir / "prefill.onnx", out_dir / "decode.onnx"

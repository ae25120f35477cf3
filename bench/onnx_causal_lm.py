"""Export a Hugging Face causal LM folder to ONNX (logits only, no KV cache) for ONNX Runtime baselines."""

from __future__ import annotations

from pathlib import Path


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

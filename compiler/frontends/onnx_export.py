"""Export a Hugging Face BERT-family encoder folder (config.json + safetensors) to ONNX.

The exported graph has:

* inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 ``[batch_size, sequence_length]``
  (both dims symbolic, named exactly so);
* one output ``last_hidden_state``: float32 ``[batch_size, sequence_length, hidden]`` (sentence
  embeddings such as MiniLM's mean pooling are computed from it outside the graph; the pooler head
  is left out because sentence-transformers checkpoints do not use it).

It uses the TorchScript-based exporter (``dynamo=False``, about 0.3 s for a small model against
several seconds for the dynamo exporter) at opset 17 (native LayerNormalization), with eager
attention so the graph is plain MatMul / Softmax.
"""

from __future__ import annotations

import os
import warnings

import torch

from slimgraph.compiler.errors import ModelLoadError

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("last_hidden_state",)
DYNAMIC_AXES = {name: {0: "batch_size", 1: "sequence_length"} for name in INPUT_NAMES}
DYNAMIC_AXES["last_hidden_state"] = {0: "batch_size", 1: "sequence_length"}


def _load_encoder(hf_folder: str) -> torch.nn.Module:
    from transformers import AutoModel

    if not os.path.isfile(os.path.join(hf_folder, "config.json")):
        raise ModelLoadError(f"{hf_folder}: not a Hugging Face model folder (no config.json)")
    try:
        model = AutoModel.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="eager")
    except Exception as exc:  # transformers raises OSError / ValueError / safetensors errors
        raise ModelLoadError(f"{hf_folder}: cannot load the model: {type(exc).__name__}: {str(exc)[:300]}") from None
    return model.eval()


class LastHiddenState(torch.nn.Module):
    """Wraps the encoder so the exported graph returns only last_hidden_state."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           return_dict=True)
        return out.last_hidden_state


def export_hf_to_onnx(hf_folder, out_path, *, opset: int = 17, example_length: int = 8) -> str:
    """Export ``hf_folder`` to ``out_path`` (a single .onnx file); returns the path."""
    hf_folder, out_path = os.fspath(hf_folder), os.fspath(out_path)
    wrapper = LastHiddenState(_load_encoder(hf_folder)).eval()
    example = (torch.ones(1, example_length, dtype=torch.long), torch.ones(1, example_length, dtype=torch.long),
               torch.zeros(1, example_length, dtype=torch.long))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, example, out_path, input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=DYNAMIC_AXES, opset_version=opset,
                          dynamo=False)
    return out_path

"""Hugging Face frontend: a model folder (config.json + safetensors) -> slimgraph IR via torch.export.

Inputs and outputs of the traced graph:

* causal LMs (``*ForCausalLM`` / ``*LMHeadModel``): ``input_ids: i64[B,T]`` -> ``logits: f32[B,T,V]``;
* everything else is loaded with ``AutoModel`` as an encoder: ``input_ids, attention_mask: i64[B,T]``
  -> ``last_hidden_state: f32[B,T,H]``. ``token_type_ids`` is *not* an input: BERT-style models then use
  their all-zeros buffer (single-segment input), which is what sentence embedders such as MiniLM feed.

``T`` is symbolic (bounded by ``max_position_embeddings``) unless ``seq_len`` is given. Models are
instantiated in float32 with ``attn_implementation="sdpa"`` (exports as one op per attention, which
the frontend decomposes) and ``use_cache=False``, from safetensors only (never pickle).
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import torch

from slimgraph.compiler.errors import ModelLoadError, UnsafeCheckpointError, UnsupportedError
from slimgraph.compiler.ir import Module

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
EXAMPLE_SEQ_LEN = 8


class HFTracingWrapper(torch.nn.Module):
    """Calls a transformers model with explicit tensor inputs and returns one tensor.

    The model's submodules are re-registered under their own names, so weights keep the checkpoint
    names (``model.layers.0.self_attn.q_proj.weight``) in the exported program.
    """

    def __init__(self, model: torch.nn.Module, causal: bool):
        super().__init__()
        object.__setattr__(self, "hf_model", model)  # not a submodule: avoids a name prefix
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in model.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.causal = causal

    @property
    def input_names(self) -> list[str]:
        return ["input_ids"] if self.causal else ["input_ids", "attention_mask"]

    @property
    def output_name(self) -> str:
        return "logits" if self.causal else "last_hidden_state"

    def forward(self, input_ids, attention_mask=None):
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        out = self.hf_model(**kwargs, use_cache=False, return_dict=True) if self.causal else \
            self.hf_model(**kwargs, return_dict=True)
        return getattr(out, self.output_name)


def is_causal_config(config: dict) -> bool:
    return any(a.endswith(CAUSAL_SUFFIXES) for a in config.get("architectures") or [])


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (not a Hugging Face model folder)",
                             hint="a model folder holds config.json and model.safetensors")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()


def _pickle_checkpoint(folder: Path) -> Path:
    """The folder's single PyTorch checkpoint (pytorch_model.bin, *.pt, *.pth), if it has no safetensors."""
    found = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if len(found) != 1:
        listed = f" (found {', '.join(p.name for p in found)})" if found else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weights and no single PyTorch checkpoint{listed}",
                             hint="convert with `model.save_pretrained(dir, safe_serialization=True)`")
    return found[0]


def _from_pickle_checkpoint(auto, folder: Path) -> torch.nn.Module:
    """Build the model from config.json and load a state dict read with ``weights_only=True``."""
    from transformers import AutoConfig

    checkpoint = _pickle_checkpoint(folder)
    state = load_torch_checkpoint(checkpoint)
    model = auto.from_config(AutoConfig.from_pretrained(folder), attn_implementation="sdpa", dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    params = model.state_dict()
    loaded = {params[name].data_ptr() for name in state if name in params}
    missing = [m for m in missing if params[m].data_ptr() not in loaded]  # tied copies are loaded
    if missing or unexpected:
        raise ModelLoadError(f"{checkpoint}: state dict does not match config.json "
                             f"(missing {missing[:5]}, unexpected {list(unexpected)[:5]})")
    return model


def load_hf_model(path) -> torch.nn.Module:
    """Instantiate the folder's model in float32 eval mode (AutoModelForCausalLM or AutoModel).

    Weights come from safetensors; a folder with only a PyTorch checkpoint is read with
    ``torch.load(weights_only=True)``, which refuses pickled code (UnsafeCheckpointError)."""
    from transformers import AutoModel, AutoModelForCausalLM

    folder = Path(path)
    config = read_config(folder)
    auto = AutoModelForCausalLM if is_causal_config(config) else AutoModel
    if not _has_safetensors(folder):
        return _from_pickle_checkpoint(auto, folder).eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto.from_pretrained(folder, attn_implementation="sdpa", use_safetensors=True,
                                         dtype=torch.float32, **({"use_cache": False} if auto is AutoModelForCausalLM else {}))
    except Exception as exc:  # transformers/safetensors raise many types; report them as one
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{folder}: transformers could not load the model: {first}") from None
    return model.eval()


def example_inputs(wrapper: HFTracingWrapper, *, seq_len: int | None, batch: int, vocab: int) -> dict:
    """Token ids (0, 1, 2, ... mod vocab) and an all-ones mask of shape [batch, seq_len or 8]."""
    t = seq_len or EXAMPLE_SEQ_LEN
    ids = (torch.arange(batch * t, dtype=torch.int64) % max(vocab, 1)).reshape(batch, t)
    inputs = {"input_ids": ids}
    if "attention_mask" in wrapper.input_names:
        inputs["attention_mask"] = torch.ones(batch, t, dtype=torch.int64)
    return inputs


def import_hf_model(model: torch.nn.Module, *, source: str, seq_len: int | None = None, batch: int = 1,
                    max_context: int | None = None) -> Module:
    """Trace an instantiated transformers model (causal LM or encoder, see module docs). With
    ``max_context``, a causal LM becomes ``prefill`` + ``decode`` over a KV cache of that many
    positions (:mod:`slimgraph.compiler.frontends.hf_generation`)."""
    from slimgraph.compiler.frontends.torch_export import import_torch_module

    config = model.config
    causal = is_causal_config({"architectures": config.architectures or [type(model).__name__]})
    if max_context is not None:
        return _import_for_generation(model, source=source, causal=causal, seq_len=seq_len, batch=batch,
                                      max_context=max_context)
    wrapper = HFTracingWrapper(model.eval(), causal)
    inputs = example_inputs(wrapper, seq_len=seq_len, batch=batch, vocab=getattr(config, "vocab_size", 2))
    dims = None if seq_len else {name: {1: "T"} for name in inputs}
    max_t = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 4096
    return import_torch_module(wrapper, inputs, dynamic_dims=dims, source=source, max_sizes={"T": int(max_t)},
                               output_names=[wrapper.output_name])


def _import_for_generation(model, *, source: str, causal: bool, seq_len, batch: int, max_context: int) -> Module:
    from slimgraph.compiler.errors import UsageError
    from slimgraph.compiler.frontends.hf_generation import import_hf_generation

    if not causal:
        raise UnsupportedError(f"{source}: {type(model).__name__} is not a causal LM; a KV cache is for "
                               "text generation (*ForCausalLM / *LMHeadModel)")
    if seq_len is not None or batch != 1:
        raise UsageError(f"{source}: a generation build takes prompts of any length at batch 1; "
                         "drop --shape (the context is set by --kv-cache)")
    if max_context < 2:
        raise UsageError(f"{source}: --kv-cache {max_context}: the context must hold at least 2 positions")
    return import_hf_generation(model, source=source, max_context=max_context)


def import_hf_folder(path, *, seq_len: int | None = None, batch: int = 1, max_context: int | None = None) -> Module:
    """Load a Hugging Face folder (config.json + safetensors) and import it as a slimgraph module."""
    model = load_hf_model(path)
    return import_hf_model(model, source=str(path), seq_len=seq_len, batch=batch, max_context=max_context)


def load_torch_checkpoint(path) -> dict:
    """Load a .pt/.pth state dict with ``torch.load(weights_only=True)`` (no arbitrary pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).strip().splitlines()
        reason = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line), "")
        raise UnsafeCheckpointError(
            f"{path}: the checkpoint needs pickle code beyond plain weights (weights_only=True refused it)"
            + (f": {reason}" if reason else ""),
            hint="re-save only the state dict (torch.save(model.state_dict(), path)) or use safetensors") from None
    except (RuntimeError, EOFError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint: {reason}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state

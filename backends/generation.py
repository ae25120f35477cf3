"""Text generation with a compiled causal LM: ``prefill`` once, then ``decode`` token by token.

The key/value caches (``[1, kv_heads, max_context, head_dim]`` per layer and kind) are allocated
on the model's device once, when the generator is made, and passed to every call: the compiled
functions write the new rows into them in place. Per decode step the host writes two int64
scalars (token, position) into device tensors that also exist once, and passes a view of a
pre-allocated all-ones attention mask whose length is the number of valid cache rows. Nothing
of the cache is reallocated or copied between steps.

Timing: ``prefill_seconds`` covers the prompt's forward pass (the logits of its last token
included), ``first_token_seconds`` the prompt's forward pass plus choosing the first token, and
decode tokens/s counts the tokens produced by ``decode`` calls over their wall time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tvm

from slimgraph.backends.sampling import SamplingOptions, TokenSampler
from slimgraph.compiler.errors import GenerationError
from slimgraph.compiler.kv_cache import GENERATION_METADATA, CacheLayout
from slimgraph.compiler.types import DType


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    first_token_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), decode_tokens_per_second=self.decode_tokens_per_second)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    stats: GenerationStats = field(default_factory=GenerationStats)


class TextGenerator:
    """Drives the ``prefill`` and ``decode`` entries of a loaded artifact over device-resident caches."""

    def __init__(self, model, tokenizer=None):
        if GENERATION_METADATA not in model.manifest or not {"prefill", "decode"} <= set(model.entries):
            raise GenerationError(f"{model.path}: not compiled for generation (no prefill/decode entries); "
                                  "compile a causal LM with --kv-cache")
        self.model = model
        self.layout = CacheLayout.from_json(model.manifest[GENERATION_METADATA])
        self.tokenizer = tokenizer
        self._prefill, self._decode = model.entries["prefill"], model.entries["decode"]
        self.caches = self._allocate_caches()
        device = model.device
        self._mask = tvm.runtime.tensor(np.ones((1, self.layout.max_context), np.int64), device)
        self._host_token = np.zeros((1, 1), np.int64)
        self._host_position = np.zeros((1, 1), np.int64)
        self._token = tvm.runtime.tensor(self._host_token, device)
        self._position = tvm.runtime.tensor(self._host_position, device)
        self.length = 0
        self.stats = GenerationStats()
        self.tokens: list[int] = []      # the new tokens of the latest (or running) generation

    def _allocate_caches(self) -> list:
        lay = self.layout
        zeros = np.zeros(lay.shape, DType(lay.dtype).numpy)
        return [tvm.runtime.tensor(zeros, self.model.device) for _ in range(2 * lay.layers)]

    # ------------------------------------------------------------------ one call each
    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Run the prompt from an empty cache; returns the logits of its last token."""
        ids = np.asarray(prompt_ids, np.int64).reshape(1, -1)
        if not 1 <= ids.shape[1] < self.layout.max_context:
            raise GenerationError(f"{self.model.path}: a prompt of {ids.shape[1]} tokens does not fit the compiled "
                                  f"context of {self.layout.max_context} (at least one position must stay free)")
        prompt = tvm.runtime.tensor(ids, self.model.device)
        result = self.model.vm["prefill"](prompt, *self.caches, *self._prefill._weights)
        self.length = ids.shape[1]
        return result[0].numpy()[0, -1]

    def decode(self, token: int) -> np.ndarray:
        """Append ``token`` at the next position; returns the logits for the position after it."""
        if self.length >= self.layout.max_context:
            raise GenerationError(f"{self.model.path}: the compiled context of {self.layout.max_context} "
                                  "tokens is full")
        self._host_token[0, 0] = token
        self._host_position[0, 0] = self.length
        self._token.copyfrom(self._host_token)
        self._position.copyfrom(self._host_position)
        mask = self._mask._create_view((1, self.length + 1))
        result = self.model.vm["decode"](self._token, self._position, mask, *self.caches, *self._decode._weights)
        self.length += 1
        return result[0].numpy()[0, -1]

    # ------------------------------------------------------------------ the loop
    def stream(self, prompt_ids: Sequence[int], options: SamplingOptions | None = None) -> Iterator[int]:
        """Yield each new token as it is chosen; ``self.stats`` holds the timings afterwards."""
        options = options or SamplingOptions()
        if len(prompt_ids) + options.max_new_tokens > self.layout.max_context:
            raise GenerationError(f"{self.model.path}: {len(prompt_ids)} prompt tokens + {options.max_new_tokens} "
                                  f"new tokens exceed the compiled context of {self.layout.max_context}")
        sampler = TokenSampler(options)
        history = list(prompt_ids)
        self.tokens = []
        self.stats = stats = GenerationStats(prompt_tokens=len(history))
        start = time.perf_counter()
        logits = self.prefill(history)
        stats.prefill_seconds = time.perf_counter() - start
        token = sampler.choose(logits, history)
        stats.first_token_seconds = time.perf_counter() - start
        while True:
            history.append(token)
            self.tokens.append(token)
            stats.new_tokens += 1
            yield token
            if sampler.finished(token, stats.new_tokens):
                return
            step = time.perf_counter()
            logits = self.decode(token)
            stats.decode_seconds += time.perf_counter() - step
            stats.decode_steps += 1
            token = sampler.choose(logits, history)

    def generate(self, prompt: str | Sequence[int], options: SamplingOptions | None = None, *,
                 chat: bool = True) -> GenerationResult:
        """Generate from text (tokenized with the model's tokenizer, its chat template when it has
        one and ``chat``) or from token ids; returns the new tokens, their text and the timings."""
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        options = options or SamplingOptions(stop_tokens=self.stop_tokens())
        tokens = list(self.stream(ids, options))
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationResult(tokens, text, self.stats)

    def stream_text(self, prompt: str | Sequence[int], options: SamplingOptions | None = None, *,
                    chat: bool = True) -> Iterator[str]:
        """Yield the text of the new tokens piece by piece (a piece ends where the text so far is
        valid: a character split over tokens waits for its last byte)."""
        tok = self._need_tokenizer()
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        shown = ""
        for _ in self.stream(ids, options or SamplingOptions(stop_tokens=self.stop_tokens())):
            text = tok.decode(self.tokens, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text

    # ------------------------------------------------------------------ tokenizer
    def encode(self, text: str, *, chat: bool = True) -> list[int]:
        tok = self._need_tokenizer()
        if chat and getattr(tok, "chat_template", None):
            return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True))
        return list(tok(text)["input_ids"])

    def stop_tokens(self) -> tuple[int, ...]:
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        return () if eos is None else (int(eos),)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise GenerationError(f"{self.model.path}: the artifact holds no tokenizer; pass token ids "
                                  "(the model had no tokenizer files in its folder)")
        return self.tokenizer


def load_tokenizer(model):
    """The tokenizer the compiler saved into the artifact (manifest ``tokenizer``), or None."""
    name = model.manifest.get("tokenizer")
    if not name:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(model.path) / name)

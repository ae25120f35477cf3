"""Choosing the next token from a language model's logits (the decoding loop's sampler).

The steps and their order are those of Hugging Face transformers' generation, so that the same
settings pick from the same distribution:

1. repetition penalty ``r`` (CTRL, Keskar et al. 2019): the logit ``l`` of every token already in
   the sequence becomes ``l / r`` if ``l > 0`` else ``l * r`` (``r > 1`` discourages repeats);
2. greedy decoding (``temperature == 0``) takes the arg-max here;
3. temperature ``t``: ``l / t``;
4. top-k: every logit below the k-th largest becomes -inf;
5. top-p (nucleus, Holtzman et al. 2019): keep the most probable tokens whose probabilities,
   sorted in decreasing order, add up to at least ``p`` (always at least one token);
6. a draw from ``softmax(l)`` with a generator seeded by ``seed`` (the same seed, logits and
   settings give the same tokens).

Generation stops after ``max_new_tokens`` tokens or at a token of ``stop_tokens`` (which is kept).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from slimgraph.compiler.errors import SamplingOptionError


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: no top-k cut
    top_p: float = 1.0                # 1: no nucleus cut
    repetition_penalty: float = 1.0   # 1: none
    seed: int | None = None
    max_new_tokens: int = 64
    stop_tokens: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        checks = (
            (self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 is none), got {self.repetition_penalty}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
        )
        for ok, message in checks:
            if not ok:
                raise SamplingOptionError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize_repeats(logits: np.ndarray, history: Iterable[int], penalty: float) -> np.ndarray:
    """Step 1: the logits of tokens in ``history`` divided (positive) or multiplied (negative) by ``penalty``."""
    seen = np.unique(np.fromiter(history, dtype=np.int64))
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    values = out[seen]
    out[seen] = np.where(values > 0, values / penalty, values * penalty)
    return out


def keep_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Step 4: logits below the k-th largest set to -inf (ties with it are kept)."""
    if k == 0 or k >= logits.size:
        return logits
    threshold = np.partition(logits, logits.size - k)[logits.size - k]
    return np.where(logits < threshold, -np.inf, logits)


def keep_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Step 5: the smallest most-probable set whose probability reaches ``p``; the rest -inf."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    before = np.cumsum(probs) - probs  # probability of the tokens ranked above each one
    out = np.full_like(logits, -np.inf)
    kept = order[before < p]
    out[kept] = logits[kept]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - np.max(logits))
    return shifted / shifted.sum()


class TokenSampler:
    """Picks one token per step from float logits over the vocabulary."""

    def __init__(self, options: SamplingOptions):
        self.options = options
        self.rng = np.random.default_rng(options.seed)

    def distribution(self, logits: np.ndarray, history: Iterable[int]) -> np.ndarray:
        """Probabilities of the next token after steps 1 and 3-5 (for a sampling decoder)."""
        o = self.options
        scores = self._penalized(logits, history) / o.temperature
        return softmax(keep_top_p(keep_top_k(scores, o.top_k), o.top_p))

    def choose(self, logits: np.ndarray, history: Iterable[int]) -> int:
        if self.options.greedy:
            return int(np.argmax(self._penalized(logits, history)))
        probs = self.distribution(logits, history)
        return int(self.rng.choice(probs.size, p=probs))

    def _penalized(self, logits: np.ndarray, history: Iterable[int]) -> np.ndarray:
        return penalize_repeats(np.asarray(logits, np.float32), history, self.options.repetition_penalty)

    def finished(self, token: int, generated: int) -> bool:
        """Whether generation ends after ``token``, the ``generated``-th new token."""
        return generated >= self.options.max_new_tokens or token in self.options.stop_tokens

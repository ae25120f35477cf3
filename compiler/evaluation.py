"""Perplexity of a causal language model computed with the compiled artifact itself.

The token stream is cut into consecutive, non-overlapping windows of ``window`` tokens; in each,
the logits at position i score token i+1, so a window of W tokens contributes W-1 predictions:

    perplexity = exp( -(1/N) * sum_windows sum_i log softmax(logits_i)[token_{i+1}] )

with N the total number of predictions. Log-softmax is computed in float64 from the artifact's
float32 logits. A short last window is kept when it has at least 2 tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from slimgraph.compiler.errors import UsageError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    predicted_tokens: int
    windows: int
    window: int

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "predicted_tokens": self.predicted_tokens,
                "windows": self.windows, "window": self.window}


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (logits: [T, vocab])."""
    scores = logits[:-1].astype(np.float64)
    shifted = scores - scores.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1))
    picked = shifted[np.arange(len(ids) - 1), ids[1:]]
    return float((log_norm - picked).sum())


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], token_ids, *, window: int = 512) -> PerplexityResult:
    """``logits_fn`` maps input_ids [1, T] (int64) to logits [1, T, vocab]."""
    ids = np.asarray(token_ids, np.int64).reshape(-1)
    if window < 2:
        raise UsageError(f"--window must be at least 2 tokens, got {window}")
    if ids.size < 2:
        raise UsageError(f"need at least 2 tokens to measure perplexity, got {ids.size}")
    total, count, windows = 0.0, 0, 0
    for start in range(0, ids.size - 1, window):
        chunk = ids[start:start + window]
        if chunk.size < 2:
            break
        logits = np.asarray(logits_fn(chunk[None, :]))[0]
        total += window_nll(logits, chunk)
        count += chunk.size - 1
        windows += 1
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, windows, window)

"""Quality metrics computed with the compiled artifact itself.

Perplexity of a causal language model: the token stream is cut into consecutive, non-overlapping
windows of ``window`` tokens; in each, the logits at position i score token i+1, so a window of W
tokens contributes W-1 predictions:

    perplexity = exp( -(1/N) * sum_windows sum_i log softmax(logits_i)[token_{i+1}] )

with N the total number of predictions. Log-softmax is computed in float64 from the artifact's
float32 logits. A short last window is kept when it has at least 2 tokens.

Embedding fidelity of a sentence encoder: each sentence's embedding is the mean of the last hidden
states over the positions its attention mask keeps, L2-normalized (the sentence-transformers
pooling of all-MiniLM-L6-v2),

    e = normalize( sum_t m_t h_t / sum_t m_t ),

and the artifact is scored by the cosine cos(e_artifact, e_reference) = e_artifact . e_reference per
sentence, summarized by its mean, minimum and 5th percentile.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from slimgraph.compiler.errors import ShapeMismatchError, UsageError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    predicted_tokens: int
    windows: int
    window: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


@dataclass(frozen=True)
class EmbeddingResult:
    mean_cosine: float
    min_cosine: float
    p05_cosine: float
    sentences: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """L2-normalized masked mean of hidden states [B, T, H] over T -> [B, H] (float64).

    Like sentence-transformers, the token count is clamped to 1e-9 and the norm to 1e-12, so an
    all-masked row gives a zero vector instead of NaN."""
    weights = np.asarray(mask, np.float64)[..., None]
    summed = (np.asarray(hidden, np.float64) * weights).sum(axis=1)
    mean = summed / np.maximum(weights.sum(axis=1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def embedding_fidelity(embed_fn: Callable[[Mapping[str, np.ndarray]], np.ndarray],
                       reference_fn: Callable[[Mapping[str, np.ndarray]], np.ndarray],
                       batches: Iterable[Mapping[str, np.ndarray]]) -> EmbeddingResult:
    """Cosine between pooled embeddings of ``embed_fn`` and ``reference_fn`` for every sentence.

    Each batch maps input names to arrays [B, T] and must hold ``attention_mask``; both functions
    map a batch to last hidden states [B, T, H]. All reference runs come before all compiled runs, so
    the two runtimes' thread pools never take turns on the cores."""
    batches = list(batches)
    theirs = [mean_pool(reference_fn(batch), batch["attention_mask"]) for batch in batches]
    cosines = []
    for batch, reference in zip(batches, theirs):
        ours = mean_pool(embed_fn(batch), batch["attention_mask"])
        if ours.shape != reference.shape:
            raise ShapeMismatchError(f"embedding sizes differ: {ours.shape[-1]} (compiled) vs "
                                     f"{reference.shape[-1]} (reference)")
        cosines.extend((ours * reference).sum(axis=-1).tolist())
    if not cosines:
        raise UsageError("no sentences to compare embeddings on")
    values = np.asarray(cosines)
    return EmbeddingResult(float(values.mean()), float(values.min()), float(np.percentile(values, 5)), values.size)


def split_sentences(text: str) -> list[str]:
    """Lines of ``text`` cut after every period followed by whitespace, stripped, empty ones dropped."""
    pieces = (piece.strip() for line in text.splitlines() for piece in re.split(r"(?<=\.)\s+", line))
    return [piece for piece in pieces if piece]


def sentence_batches(text: str, encode: Callable[[str], list], *, max_sentences: int,
                     min_tokens: int = 8, max_tokens: int = 128) -> list[dict[str, np.ndarray]]:
    """The first ``max_sentences`` sentences whose encoding (special tokens included) has
    ``min_tokens``..``max_tokens`` ids, each as its own batch of one at its true length."""
    if max_sentences < 1:
        raise UsageError(f"--max-sentences must be at least 1, got {max_sentences}")
    batches = []
    for sentence in split_sentences(text):
        ids = np.asarray(encode(sentence), np.int64)
        if min_tokens <= ids.size <= max_tokens:
            batches.append({"input_ids": ids[None, :], "attention_mask": np.ones((1, ids.size), np.int64)})
        if len(batches) == max_sentences:
            break
    return batches

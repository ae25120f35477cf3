"""Calibration data and the activation statistics that compression methods need.

Sources (``--calib``): a text file, tokenized with the model's own tokenizer and cut into
``samples`` windows of ``seq_len`` consecutive tokens (of the fixed length instead, for a model
compiled with a static token count); an ``.npz`` file whose arrays are named
like the model's inputs (one call each, or stacked along a leading sample axis); or, by default,
the built-in calibration text (Wikipedia articles disjoint from the evaluation slice).

Statistics are streamed: the reference interpreter runs one calibration sample at a time and
:class:`StatsCollector` folds each observed activation ``X`` (rows = tokens, K = features) into

* ``hessian``  = mean over tokens of ``x x^T`` (K x K, float64) -- GPTQ, SparseGPT, whitening;
* ``abs_mean`` = mean over tokens of ``|x|`` (K) -- AWQ, ASVD;
* ``sample``   = up to ``sample_rows`` token rows kept by reservoir sampling -- AWQ's scale
  search and the per-layer output error (SQNR) in the compile report;
* ``peaks``    = the ``PEAK_ROWS`` rows with the largest ``max_j |x_j|`` seen -- the rare "massive
  activation" tokens (the first token of a window, some delimiters) that a uniform sample almost
  never holds, yet which the model's attention leans on; AWQ's clip search must not harm them,

so no sample's activations outlive its own forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from slimgraph.compiler.errors import CalibrationError
from slimgraph.compiler.ir import Module

Batch = Mapping[str, np.ndarray]
PEAK_ROWS = 32


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration data comes from: ``path`` None means the built-in text."""

    path: str | None = None
    samples: int = 16
    seq_len: int = 512

    def describe(self) -> str:
        where = self.path or "built-in Wikipedia calibration text"
        return f"{where} ({self.samples} x {self.seq_len} tokens)"


@dataclass
class InputStats:
    """Running statistics of one activation (see the module docstring)."""

    hessian: np.ndarray
    abs_mean: np.ndarray
    sample: np.ndarray
    tokens: int = 0
    peaks: np.ndarray | None = None
    _rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    @classmethod
    def empty(cls, k: int, sample_rows: int) -> "InputStats":
        return cls(np.zeros((k, k)), np.zeros(k), np.zeros((0, k), np.float32), 0, np.zeros((0, k), np.float32))

    def add(self, rows: np.ndarray, sample_rows: int) -> None:
        x = rows.astype(np.float64)
        n, total = len(x), self.tokens + len(x)
        self.hessian += (x.T @ x - n * self.hessian) / total
        self.abs_mean += (np.abs(x).sum(axis=0) - n * self.abs_mean) / total
        self._reservoir(rows.astype(np.float32), sample_rows)
        self._keep_peaks(rows.astype(np.float32))
        self.tokens = total

    def _keep_peaks(self, rows: np.ndarray) -> None:
        """Keep the PEAK_ROWS rows of largest max |x| among the kept ones and ``rows``."""
        both = rows if self.peaks is None else np.concatenate([self.peaks, rows])
        top = np.argsort(-np.abs(both).max(axis=1), kind="stable")[:PEAK_ROWS]
        self.peaks = both[np.sort(top)]

    def _reservoir(self, rows: np.ndarray, sample_rows: int) -> None:
        """Keep a uniform random subset of at most ``sample_rows`` rows of everything seen."""
        room = sample_rows - len(self.sample)
        if room > 0:
            self.sample = np.concatenate([self.sample, rows[:room]])
            rows, seen = rows[room:], self.tokens + room
        else:
            seen = self.tokens
        if len(rows) == 0:
            return
        slots = self._rng.integers(0, seen + np.arange(1, len(rows) + 1))
        keep = slots < sample_rows
        self.sample[slots[keep]] = rows[keep]

    @property
    def sq_mean(self) -> np.ndarray:
        """Mean of x_j^2 per input channel (the Hessian's diagonal)."""
        return np.diag(self.hessian).copy()


_RECENT: dict[str, dict] = {}
_RECENT_LIMIT = 2


def fingerprint(module: Module, batches: list[Batch]) -> str:
    """Content hash of a module (its printed IR, weight digests included) and calibration inputs."""
    import hashlib

    from slimgraph.compiler.printer import print_module

    h = hashlib.blake2b(print_module(module).encode(), digest_size=16)
    for batch in batches:
        for name in sorted(batch):
            h.update(name.encode())
            h.update(np.ascontiguousarray(batch[name]).tobytes())
    return h.hexdigest()


def cached_stats(module: Module, batches: list[Batch], values: Iterable[str]) -> dict[str, InputStats]:
    """:func:`collect_stats` remembering the statistics of the two most recent (module, data) pairs, so
    compilations that calibrate the same module on the same data (a sweep over quantizers, or
    several steps reading one activation) run the calibration forward passes once."""
    key = fingerprint(module, batches)
    known = _RECENT.pop(key, {})
    _RECENT[key] = known                      # most recent last
    while len(_RECENT) > _RECENT_LIMIT:
        _RECENT.pop(next(iter(_RECENT)))
    missing = set(values) - set(known)
    if missing:
        known.update(collect_stats(module, batches, missing))
    return {v: known[v] for v in values if v in known}


def collect_stats(module: Module, batches: Iterable[Batch], values: Iterable[str], *,
                  sample_rows: int = 512) -> dict[str, InputStats]:
    """Run the module's entry function on every batch and gather :class:`InputStats` for each
    named value of it (float tensors whose last axis is the feature axis)."""
    from slimgraph.compiler import interpreter

    wanted = set(values)
    stats: dict[str, InputStats] = {}

    def observe(name: str, value: np.ndarray) -> None:
        if name in wanted:
            rows = value.reshape(-1, value.shape[-1])
            stats.setdefault(name, InputStats.empty(rows.shape[1], sample_rows)).add(rows, sample_rows)

    count = 0
    for batch in batches:
        interpreter.run(module, batch, observe=observe)
        count += 1
    if count == 0:
        raise CalibrationError("calibration data is empty: no sample to compute activation statistics from")
    return stats


# ----------------------------------------------------------------------------- loading samples
def load_batches(spec: CalibrationSpec, module: Module, model_folder: str | None) -> list[dict[str, np.ndarray]]:
    """Calibration inputs for the module's entry function, from ``spec``."""
    if spec.samples < 1 or spec.seq_len < 2:
        raise CalibrationError(f"calibration needs at least 1 sample of 2 tokens, got {spec.samples} x {spec.seq_len}")
    if spec.path is not None and Path(spec.path).suffix == ".npz":
        return _npz_batches(Path(spec.path), module)
    if spec.path is not None:
        text_path = Path(spec.path)
    else:
        from slimgraph.models.wiki_text import wiki_split

        text_path = wiki_split().calibration
    return _text_batches(text_path, spec, module, model_folder)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read calibration text ({exc})") from None
    if not text.strip():
        raise CalibrationError(f"{path}: calibration text is empty")
    return text


def _text_batches(path: Path, spec: CalibrationSpec, module: Module, folder: str | None) -> list[dict]:
    text = _read_text(path)
    if folder is None or not (Path(folder) / "tokenizer_config.json").is_file():
        raise CalibrationError(f"{path}: the model has no tokenizer to turn calibration text into tokens; "
                               "pass --calib FILE.npz with input arrays instead")
    from transformers import AutoTokenizer

    ids = np.asarray(AutoTokenizer.from_pretrained(folder)(text)["input_ids"], np.int64)
    length = _static_length(module) or spec.seq_len
    windows = [ids[i:i + length] for i in range(0, len(ids) - 1, length)][: spec.samples]
    windows = [w for w in windows if len(w) == length] if _static_length(module) else [w for w in windows if len(w) >= 2]
    if not windows:
        raise CalibrationError(f"{path}: calibration text has fewer than 2 tokens")
    return [_token_inputs(module, w) for w in windows]


def _static_length(module: Module) -> int | None:
    """The token count of a module compiled for one fixed length (``--shape input_ids=1x128``): its
    calibration windows have exactly that many tokens. None when the length is symbolic."""
    for p in module.main.params:
        if p.name == "input_ids" and p.type.rank == 2 and isinstance(p.type.shape[1], int):
            return p.type.shape[1]
    return None


def _token_inputs(module: Module, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of a text model for one window: ids, an all-ones mask, zero token types."""
    fills = {"attention_mask": 1, "token_type_ids": 0}
    out = {}
    for p in module.main.params:
        if p.name == "input_ids":
            out[p.name] = ids[None, :].astype(p.type.dtype.numpy)
        elif p.name in fills:
            out[p.name] = np.full((1, len(ids)), fills[p.name], p.type.dtype.numpy)
        elif p.name == "position_ids":
            out[p.name] = np.arange(len(ids), dtype=p.type.dtype.numpy)[None, :]
        else:
            raise CalibrationError(f"cannot build input {p.name!r} from text; pass --calib FILE.npz instead")
    return out


def _npz_batches(path: Path, module: Module) -> list[dict[str, np.ndarray]]:
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None
    params = module.main.params
    missing = [p.name for p in params if p.name not in arrays]
    if missing:
        raise CalibrationError(f"{path}: no array for model input(s) {missing} (has {sorted(arrays)})")
    stacked = all(arrays[p.name].ndim == p.type.rank + 1 for p in params)
    if not stacked:
        return [{p.name: arrays[p.name] for p in params}]
    count = len(arrays[params[0].name])
    if count == 0:
        raise CalibrationError(f"{path}: calibration arrays hold no samples")
    return [{p.name: arrays[p.name][i] for p in params} for i in range(count)]

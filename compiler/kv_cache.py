"""The key/value-cache layout of a module compiled for generation (``prefill`` + ``decode``).

The frontend records it in the module's metadata under ``generation``; the compiler copies it into
the artifact's manifest, and the runtime allocates the caches from it: ``2 * layers`` tensors of
``[1, kv_heads, max_context, head_dim]`` in ``dtype`` (``past.N.key``, ``past.N.value``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

GENERATION_METADATA = "generation"


@dataclass(frozen=True)
class CacheLayout:
    layers: int
    kv_heads: int
    head_dim: int
    max_context: int
    vocab: int
    dtype: str = "f32"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, self.kv_heads, self.max_context, self.head_dim)

    def cache_bytes(self, itemsize: int) -> int:
        return 2 * self.layers * self.kv_heads * self.max_context * self.head_dim * itemsize

    def with_dtype(self, dtype: str) -> "CacheLayout":
        return replace(self, dtype=dtype)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CacheLayout":
        return cls(**json.loads(text))

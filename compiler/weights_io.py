"""Safetensors files read as memory maps and written with hashes.

Reading parses the safetensors header (8-byte little-endian length + JSON) and returns numpy
memmaps over the data, so weights are paged in on use and never copied by slimgraph.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from slimgraph.compiler.errors import ModelLoadError

_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
              "I16": np.int16, "I32": np.int32, "U32": np.uint32, "I64": np.int64, "BOOL": np.bool_}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file (bf16 is not supported: ModelLoadError)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ModelLoadError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ModelLoadError(f"{path}: tensor {name} has inconsistent size")
        if end == start:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)
    return out


def write_safetensors(arrays: dict[str, np.ndarray], path: str | Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, order="C") for k, v in sorted(arrays.items())}, str(path))


def hash_file_into(h, path: str | Path, chunk: int = 1 << 22) -> None:
    """Feed a file's bytes into the hash object ``h`` in chunks."""
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()

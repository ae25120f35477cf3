"""Safetensors files read as memory maps and written with hashes.

Reading parses the safetensors header (8-byte little-endian length + JSON) and returns numpy
memmaps over the data, so weights are paged in on use and never copied by slimgraph.

Sparse weights (pruned matrices) are stored compressed when that saves space: a float tensor
``W`` with at least :data:`SPARSE_MIN_ZEROS` of its entries zero is written as two tensors,
``W::mask`` (one bit per entry, ``np.packbits`` of ``W != 0`` in row-major order) and
``W::values`` (the nonzero entries in that order), and listed in the file's metadata
(``"sparse": {name: {"shape", "dtype"}}``). At 50% sparsity a float32 matrix takes
0.5 + 1/32 of its dense bytes. Reading rebuilds the dense tensor.
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
    layout = json.loads(header.get("__metadata__", {}).get("sparse", "{}"))
    return _densify(out, layout, path) if layout else out


SPARSE_MIN_ZEROS = 0.25
SPARSE_MIN_ELEMENTS = 4096
_MASK, _VALUES = "::mask", "::values"


def write_safetensors(arrays: dict[str, np.ndarray], path: str | Path, *, sparse: bool = False) -> dict:
    """Write ``arrays``; with ``sparse=True`` mostly-zero float tensors are stored compressed.
    Returns {name: stored bytes} for the compressed ones."""
    from safetensors.numpy import save_file

    tensors, layout, saved = {}, {}, {}
    for name, value in sorted(arrays.items()):
        value = np.asarray(value, order="C")
        if sparse and _worth_compressing(value):
            mask = value.reshape(-1) != 0
            tensors[name + _MASK] = np.packbits(mask)
            tensors[name + _VALUES] = value.reshape(-1)[mask]
            layout[name] = {"shape": list(value.shape), "dtype": value.dtype.name}
            saved[name] = tensors[name + _MASK].nbytes + tensors[name + _VALUES].nbytes
        else:
            tensors[name] = value
    save_file(tensors, str(path), metadata={"sparse": json.dumps(layout)} if layout else None)
    return saved


def _worth_compressing(value: np.ndarray) -> bool:
    if value.dtype.kind != "f" or value.size < SPARSE_MIN_ELEMENTS:
        return False
    return np.count_nonzero(value) <= (1.0 - SPARSE_MIN_ZEROS) * value.size


def _densify(out: dict[str, np.ndarray], layout: dict, path: Path) -> dict[str, np.ndarray]:
    """Replace each ``name::mask`` / ``name::values`` pair by the dense tensor it encodes."""
    for name, info in layout.items():
        try:
            mask, values = out.pop(name + _MASK), out.pop(name + _VALUES)
        except KeyError:
            raise ModelLoadError(f"{path}: sparse tensor {name} lacks its mask or values") from None
        shape = tuple(info["shape"])
        size = int(np.prod(shape, dtype=np.int64))
        bits = np.unpackbits(np.asarray(mask), count=size).astype(bool)
        if int(bits.sum()) != values.size:
            raise ModelLoadError(f"{path}: sparse tensor {name}: mask and values disagree")
        dense = np.zeros(size, np.dtype(info["dtype"]))
        dense[bits] = values
        out[name] = dense.reshape(shape)
    return out


def hash_file_into(h, path: str | Path, chunk: int = 1 << 22) -> None:
    """Feed a file's bytes into the hash object ``h`` in chunks."""
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()

"""Carrying compiled CUDA artifacts to the GPU machine, whose runs take at most 64 MiB each.

``pack`` (here) copies each artifact without its weights file and writes a plan that rebuilds the
weights there, weight by weight, from one of:

* ``pool``   -- the array itself, stored once per distinct content in a pool that is xz-compressed
  and cut into parts small enough for one run each (SmolLM2's 538 MB of float32 weights become
  ~250 MB; the parts travel over back-to-back runs into ``/tmp`` on the GPU machine);
* ``half``   -- float16 cast (round to nearest even, fill values clamped as the half_precision pass
  does) of a pool array: the ``--fp16`` artifacts need no bytes of their own;
* ``inline`` -- small arrays (folded rotary tables of static-shape builds), stored with the plan;
* ``random`` -- artifacts measured for speed only: arrays of the right dtype and shape, drawn there.

``unpack`` (there) rebuilds every artifact's ``weights.safetensors`` with slimgraph's own writer;
exact artifacts are then loaded with their file hashes verified, so a wrong rebuild cannot pass.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
from pathlib import Path

import numpy as np

from slimgraph.compiler.weights_io import read_safetensors, write_safetensors

ARTIFACT_FILES = ("model.so", "manifest.json", "report.json", "graph.ir")
INLINE_BYTES = 64 << 10
PART_BYTES = 52 << 20
F16_MAX = float(np.finfo(np.float16).max)


def digest(array: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{array.dtype.str}{list(array.shape)}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def to_half(array: np.ndarray) -> np.ndarray:
    if array.size <= 16:
        array = np.asarray(np.clip(array, -F16_MAX, F16_MAX))
    return array.astype(np.float16)


class Pool:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, array: np.ndarray) -> str:
        key = digest(array)
        self.arrays.setdefault(key, np.ascontiguousarray(array).reshape(array.shape))   # keeps 0-d arrays 0-d
        return key

    def write(self, folder: Path) -> list[str]:
        """The pool as ``pool.json`` (offsets) + xz parts ``pool.xz.000``...; returns the part names."""
        index, offset = {}, 0
        compressor = lzma.LZMACompressor(preset=1)
        compressed = bytearray()
        for key, array in self.arrays.items():
            index[key] = {"offset": offset, "dtype": array.dtype.str, "shape": list(array.shape)}
            compressed += compressor.compress(array.tobytes())
            offset += array.nbytes
        compressed += compressor.flush()
        (folder / "pool.json").write_text(json.dumps(index))
        parts = []
        for i in range(0, len(compressed), PART_BYTES):
            name = f"pool.xz.{i // PART_BYTES:03d}"
            (folder / name).write_bytes(compressed[i:i + PART_BYTES])
            parts.append(name)
        return parts


def _plan_weights(arrays: dict, policy: str, pool: Pool, sources: dict[str, np.ndarray], inline: dict,
                  inline_bytes: int) -> list:
    plan = []
    for name, array in arrays.items():
        entry = {"name": name, "dtype": array.dtype.str, "shape": list(array.shape)}
        source = sources.get(name)
        if policy == "random":
            entry["source"] = "random"
        elif source is not None and array.dtype == np.float16 and np.array_equal(to_half(source), array):
            entry["source"], entry["key"] = "half", pool.add(source)
        elif array.nbytes <= inline_bytes:
            entry["source"], inline[name] = "inline", array
        else:
            entry["source"], entry["key"] = "pool", pool.add(array)
        plan.append(entry)
    return plan


def pack(artifacts: dict[str, tuple[Path, str]], out: Path, *, inline_bytes: int = INLINE_BYTES) -> dict:
    """artifacts: name -> (artifact dir, "exact" | "random"). Exact float32 artifacts are planned
    first, so float16 ones find their sources by weight name."""
    if out.exists():
        shutil.rmtree(out)
    (out / "artifacts").mkdir(parents=True)
    pool, sources = Pool(), {}
    order = sorted(artifacts, key=lambda n: artifacts[n][1] != "exact")
    for name in order:
        path, policy = artifacts[name]
        arrays = read_safetensors(path / "weights.safetensors")
        target = out / "artifacts" / name
        target.mkdir()
        for file in ARTIFACT_FILES:
            shutil.copy2(path / file, target / file)
        inline: dict = {}
        plan = _plan_weights(arrays, policy, pool, sources if policy == "exact" else {}, inline, inline_bytes)
        if inline:
            np.savez(target / "inline.npz", **inline)
        (target / "weights.plan.json").write_text(json.dumps({"policy": policy, "weights": plan}))
        if policy == "exact":
            sources.update({k: v for k, v in arrays.items() if v.dtype == np.float32})
    parts = pool.write(out)
    summary = {"artifacts": {n: artifacts[n][1] for n in artifacts}, "pool_parts": parts,
               "pool_bytes": sum(a.nbytes for a in pool.arrays.values())}
    (out / "bundle.json").write_text(json.dumps(summary, indent=1))
    return summary


def _read_pool(bundle: Path, parts_dir: Path):
    """A lookup of pool arrays by key; the parts are read and decompressed at the first lookup."""
    index = json.loads((bundle / "pool.json").read_text())
    names = json.loads((bundle / "bundle.json").read_text())["pool_parts"]
    loaded: list[bytes] = []

    def get(key: str) -> np.ndarray:
        if not loaded:
            loaded.append(lzma.decompress(b"".join((parts_dir / n).read_bytes() for n in names)))
        raw = loaded[0]
        meta = index[key]
        dtype = np.dtype(meta["dtype"])
        count = int(np.prod(meta["shape"], dtype=np.int64))
        return np.frombuffer(raw, dtype, count, meta["offset"]).reshape(meta["shape"])

    return get


def _random_array(entry: dict, rng: np.random.Generator) -> np.ndarray:
    dtype, shape = np.dtype(entry["dtype"]), entry["shape"]
    if dtype.kind == "f":
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, 0), min(info.max, 2 ** 31 - 1), size=shape, dtype=np.int64).astype(dtype)


def unpack(bundle: Path, parts_dir: Path, out: Path, patterns: str = "*") -> dict[str, tuple[Path, str]]:
    """Rebuild the artifacts whose names match one of the comma-separated ``patterns`` into
    ``out/<name>``; returns name -> (path, policy)."""
    get = _read_pool(bundle, parts_dir)
    rng = np.random.default_rng(0)
    built = {}
    chosen = {p for pattern in patterns.split(",") for p in (bundle / "artifacts").glob(pattern.strip())}
    for source in sorted(chosen):
        target = out / source.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        plan = json.loads((target / "weights.plan.json").read_text())
        inline = dict(np.load(target / "inline.npz")) if (target / "inline.npz").is_file() else {}
        arrays = {}
        for entry in plan["weights"]:
            kind = entry["source"]
            arrays[entry["name"]] = (inline[entry["name"]] if kind == "inline" else get(entry["key"]) if kind == "pool"
                                     else to_half(get(entry["key"])) if kind == "half" else _random_array(entry, rng))
        write_safetensors(arrays, target / "weights.safetensors", sparse=True)
        built[source.name] = (target, plan["policy"])
    return built

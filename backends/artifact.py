"""Compiled artifacts: a directory with the library, the weights, a manifest and a report.

    OUT/
      model.so              compiled kernels + VM bytecode (no weights inside)
      weights.safetensors   every weight the entry functions take
      manifest.json         versions, target, input model hash, pipeline/options, entry signatures, sha256 of files
      report.json           per-pass nodes/kernels, weight bytes, compile time
      ir/NN-pass.ir         IR dumps when asked

The directory is written under a temporary name next to OUT and renamed into place, so a failed
compile never leaves a partial artifact; an existing OUT is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slimgraph.compiler.errors import ArtifactIntegrityError, OutputExistsError
from slimgraph.compiler.weights_io import sha256_file

LIBRARY = "model.so"
GRAPH = "graph.ir"
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
REPORT = "report.json"
FORMAT = "slimgraph-artifact"
FORMAT_VERSION = 1


class ArtifactWriter:
    """Context manager that yields a temporary directory and atomically publishes it on success."""

    def __init__(self, out: str | Path, *, force: bool = False):
        self.out = Path(out).absolute()
        self.force = force
        if self.out.exists() and not force:
            raise OutputExistsError(f"{self.out} already exists; pass --force to replace it")

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, trash / "old")
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        return False


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def seal_manifest(directory: Path, manifest: dict) -> dict:
    """Add the sha256 of every file in the directory (except the manifest) and write it."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(directory).as_posix()] = sha256_file(path)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, files=files)
    write_json(directory / MANIFEST, manifest)
    return manifest


@dataclass
class ArtifactInfo:
    path: Path
    manifest: dict

    @property
    def library(self) -> Path:
        return self.path / LIBRARY

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactIntegrityError(f"{path}: not a slimgraph artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactIntegrityError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactIntegrityError(f"{manifest_path}: not a slimgraph manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactIntegrityError(f"{manifest_path}: format version {manifest.get('format_version')} "
                                     f"is not {FORMAT_VERSION}; recompile the model")
    return manifest


def open_artifact(path: str | Path, *, verify_hashes: bool = True) -> ArtifactInfo:
    """Read the manifest and check every listed file's sha256 before anything is loaded."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify_hashes:
        for rel, digest in manifest["files"].items():
            file = path / rel
            if not file.is_file():
                raise ArtifactIntegrityError(f"{file}: listed in the manifest but missing")
            if sha256_file(file) != digest:
                raise ArtifactIntegrityError(f"{file}: content does not match its sha256 in {MANIFEST} "
                                             "(modified or corrupted); recompile the model")
    return ArtifactInfo(path, manifest)


def artifact_module(path: str | Path):
    """The final IR of an artifact (``graph.ir``) with its weights attached, as the reference
    interpreter runs it."""
    import numpy as np

    from slimgraph.compiler.ir import Weight
    from slimgraph.compiler.printer import parse_module
    from slimgraph.compiler.weights_io import read_safetensors

    path = Path(path)
    module = parse_module((path / GRAPH).read_text(), source=str(path / GRAPH))
    arrays = read_safetensors(path / WEIGHTS)
    return module.with_weights({name: Weight(np.asarray(arrays[name])) for name in module.weights})

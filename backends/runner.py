"""Load and run compiled artifacts: ``slimgraph.load(path)`` returns a :class:`CompiledModel`.

Loading verifies every file hash and the target before the library is opened; weights are read
from the artifact's safetensors (memory-mapped) and copied once into TVM tensors. Calls check each
input's dtype and shape (symbolic dims must agree across inputs) and return numpy arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import tvm
import tvm.runtime.vm

from slimgraph.backends.artifact import open_artifact
from slimgraph.backends.targets import TargetSpec, check_runnable_here, family_of
from slimgraph.compiler.errors import RuntimeInputError
from slimgraph.compiler.interpreter import check_input_arrays
from slimgraph.compiler.types import TensorType
from slimgraph.compiler.weights_io import read_safetensors


class EntryPoint:
    """One callable function of a compiled model (``main``, ``prefill``, ``decode``...)."""

    def __init__(self, model: "CompiledModel", name: str, signature: dict):
        self.model = model
        self.name = name
        self.input_names = [n for n, _ in signature["inputs"]]
        self.input_types = [TensorType.parse(t) for _, t in signature["inputs"]]
        self.output_names = list(signature["outputs"])
        self._weights = [model.weight_tensors[w] for w in signature["weights"]]

    def _arrays(self, args: Sequence, kwargs: Mapping) -> list[np.ndarray]:
        if args and kwargs:
            raise RuntimeInputError(f"@{self.name}: pass inputs either by position or by name, not both")
        if kwargs:
            unknown = sorted(set(kwargs) - set(self.input_names))
            missing = [n for n in self.input_names if n not in kwargs]
            if unknown or missing:
                raise RuntimeInputError(f"@{self.name}: inputs are {self.input_names}; "
                                        f"missing {missing}, unknown {unknown}")
            args = [kwargs[n] for n in self.input_names]
        return [np.asarray(a, order="C") for a in args]

    def check(self, arrays: list[np.ndarray]) -> dict[str, int]:
        """Validate dtypes and shapes; returns the bound symbolic dims."""
        return check_input_arrays(list(zip(self.input_names, self.input_types)), arrays, where=f"@{self.name} ")

    def _tensors(self, args: Sequence, kwargs: Mapping) -> list:
        """Checked inputs as TVM tensors on the model's device."""
        arrays = self._arrays(args, kwargs)
        self.check(arrays)
        return [tvm.runtime.tensor(a, self.model.device) for a in arrays]

    def __call__(self, *args, **kwargs) -> list[np.ndarray]:
        result = self.model.vm[self.name](*self._tensors(args, kwargs), *self._weights)
        outs = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return [o.numpy() for o in outs]

    def prepared(self, *args, **kwargs):
        """A zero-argument callable running this entry on inputs converted to device tensors once
        (for timing loops: no host copies per call); it returns the raw TVM result, not numpy."""
        tensors = self._tensors(args, kwargs)
        function = self.model.vm[self.name]
        return lambda: function(*tensors, *self._weights)

    def time(self, *args, number: int = 10, repeat: int = 3, **kwargs) -> list[float]:
        """Per-call seconds measured by TVM's time evaluator (inputs converted once)."""
        evaluator = self.model.vm.time_evaluator(self.name, self.model.device, number=number, repeat=repeat)
        return list(evaluator(*self._tensors(args, kwargs), *self._weights).results)


class CompiledModel:
    """A loaded artifact. Call it like its first entry function; other entries by attribute/index."""

    def __init__(self, path: str | Path, *, verify_hashes: bool = True, threads: int | None = None):
        use_threads(threads)
        info = open_artifact(path, verify_hashes=verify_hashes)
        self.path = info.path
        self.manifest = info.manifest
        self.target = TargetSpec.from_dict(self.manifest["target"])
        check_runnable_here(self.target, str(self.path))
        self.device = family_of(self.target).device(self.target)
        library_path = _unique_library_path(info.library, self.manifest) if verify_hashes else info.library
        library = tvm.runtime.load_module(str(library_path))
        self.vm = tvm.runtime.vm.VirtualMachine(library, self.device)
        arrays = read_safetensors(info.weights)
        self.weight_tensors = {name: tvm.runtime.tensor(np.asarray(a, order="C"), self.device)
                               for name, a in arrays.items()}
        self.entries = {name: EntryPoint(self, name, sig) for name, sig in self.manifest["entries"].items()}
        self.main = next(iter(self.entries.values()))
        self._generator = None

    @property
    def input_names(self) -> list[str]:
        return self.main.input_names

    @property
    def output_names(self) -> list[str]:
        return self.main.output_names

    def __getitem__(self, name: str) -> EntryPoint:
        return self.entries[name]

    @property
    def generator(self):
        """The :class:`~slimgraph.backends.generation.TextGenerator` of an artifact compiled with
        ``--kv-cache`` (made on first use: it allocates the KV caches on the device)."""
        if self._generator is None:
            from slimgraph.backends.generation import TextGenerator, load_tokenizer

            self._generator = TextGenerator(self, load_tokenizer(self))
        return self._generator

    def generate(self, prompt, options=None, **sampling):
        """Generate from a prompt (text or token ids); returns a GenerationResult (token ids,
        text, timings). ``sampling`` are SamplingOptions fields (``max_new_tokens=64``, ...)."""
        return self.generator.generate(prompt, self._sampling(options, sampling))

    def stream(self, prompt, options=None, **sampling):
        """Iterate over the text pieces of the new tokens as they are generated."""
        return self.generator.stream_text(prompt, self._sampling(options, sampling))

    def _sampling(self, options, sampling):
        from slimgraph.backends.sampling import SamplingOptions

        if options is not None and sampling:
            raise RuntimeInputError("pass either a SamplingOptions or its fields, not both")
        if options is None:
            sampling.setdefault("stop_tokens", self.generator.stop_tokens())
            options = SamplingOptions(**sampling)
        return options

    def __call__(self, *args, **kwargs) -> list[np.ndarray]:
        return self.main(*args, **kwargs)


def _unique_library_path(library: Path, manifest: dict) -> Path:
    """A private copy of the library named after its sha256. The dynamic loader hands back an
    already loaded library when the path -- or the file's inode, which a rebuilt artifact may
    reuse -- matches, so reloading an artifact rebuilt in place would run the old kernels; a copy
    that outlives this process's libraries has its own name and inode. Only used once the file's
    sha256 was checked against the manifest."""
    import shutil
    import tempfile

    digest = manifest.get("files", {}).get(library.name)
    if digest is None:
        return library
    folder = Path(tempfile.gettempdir()) / f"slimgraph-libraries-{os.getuid()}"
    copy = folder / f"{digest[:32]}{library.suffix}"
    try:
        if not copy.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{copy.name}.{os.getpid()}.tmp"
            shutil.copyfile(library, tmp)
            os.replace(tmp, copy)
    except OSError:
        return library
    return copy


def use_threads(threads: int | None) -> None:
    """TVM's thread pool assumes half the CPUs are hyperthreads and would use 1 of 2 cores here;
    default to every CPU this process may run on (TVM_NUM_THREADS set by the user wins)."""
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def load_artifact(path: str | Path, **kwargs) -> CompiledModel:
    return CompiledModel(path, **kwargs)

"""Making TVM's CUDA runtime library loadable, on a GPU machine and on a build machine without one.

TVM's CUDA support lives in ``libtvm_runtime_cuda.so``, which links the driver library
``libcuda.so.1``. ``import tvm`` tries to load it and silently goes on without it when the driver is
absent (a build machine with nvcc but no GPU): CUDA builds then embed CUDA *source* in the library,
to be compiled when it is loaded -- which fails on a deployment machine. And in runtime-only
installs (the ~5 MB bundle) ``import tvm`` does not load it at all.

:func:`ensure_cuda_runtime` loads it after the fact. Where no driver can be loaded, it first loads a
stand-in ``libcuda.so.1`` built here from the list of driver functions TVM's library imports (each
returns ``CUDA_ERROR_NO_DEVICE``): enough to compile real machine code (fatbin) with nvcc, never to
run a kernel. The stand-in is built once into ``~/.cache/slimgraph/cuda-driver-stub``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

from slimgraph.compiler.errors import TargetError

CUDA_ERROR_NO_DEVICE = 100
STUB_DIR = Path(os.environ.get("SLIMGRAPH_CACHE", Path.home() / ".cache" / "slimgraph")) / "cuda-driver-stub"
_state: dict = {}


def tvm_library_dir() -> Path:
    import tvm

    return Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent


def driver_available() -> bool:
    """Whether the real CUDA driver library loads in this process."""
    if "driver" not in _state:
        try:
            ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
            _state["driver"] = not _state.get("stub_loaded", False)
        except OSError:
            _state["driver"] = False
    return _state["driver"]


def _driver_symbols(library: Path) -> list[str]:
    nm = shutil.which("nm")
    if nm is None:
        raise TargetError("building for CUDA without a GPU driver needs nm to list the driver functions TVM uses",
                          hint="install binutils")
    out = subprocess.run([nm, "-D", "--undefined-only", str(library)], capture_output=True, text=True, check=True)
    names = {line.split()[-1].split("@")[0] for line in out.stdout.splitlines() if line.strip()}
    return sorted(n for n in names if n.startswith("cu") and n[2:3].isupper())


def build_driver_stub(library: Path, folder: Path = STUB_DIR) -> Path:
    """``folder/libcuda.so.1`` exporting every ``cu*`` function ``library`` imports, each failing."""
    target = folder / "libcuda.so.1"
    symbols = _driver_symbols(library)
    source = "".join(f"int {name}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n" for name in symbols)
    source_file = folder / "libcuda_stub.c"
    if target.is_file() and source_file.is_file() and source_file.read_text() == source:
        return target
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        raise TargetError("building for CUDA without a GPU driver needs a C compiler for the driver stand-in",
                          hint="install gcc")
    folder.mkdir(parents=True, exist_ok=True)
    source_file.write_text(source)
    tmp = folder / f"libcuda.so.1.{os.getpid()}.tmp"
    subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(source_file)],
                   check=True, capture_output=True)
    os.replace(tmp, target)
    return target


def ensure_cuda_runtime() -> bool:
    """Load TVM's CUDA runtime library; returns whether a real driver backs it (False: build only)."""
    import tvm

    loaded = tvm.base._LOADED_LIBS
    if "tvm_runtime_cuda" not in loaded:
        library = tvm_library_dir() / "libtvm_runtime_cuda.so"
        if not library.is_file():
            raise TargetError(f"this TVM install has no CUDA runtime ({library} is missing)",
                              hint="install the apache-tvm wheel, which is built with CUDA")
        if not driver_available():
            ctypes.CDLL(str(build_driver_stub(library)), mode=ctypes.RTLD_GLOBAL)
            _state["stub_loaded"] = True
        loaded["tvm_runtime_cuda"] = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    return driver_available() and not _state.get("stub_loaded", False)

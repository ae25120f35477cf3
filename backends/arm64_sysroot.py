"""An aarch64 Linux userland on an x86 machine, for running ARM artifacts under ``qemu-aarch64``.

Built from Debian's arm64 packages and PyPI's aarch64 wheels, without root (once
``dpkg --add-architecture arm64 && apt-get update`` has been run, as ``.ci/run`` does)::

    python -m slimgraph.backends.arm64_sysroot            # builds ~/.cache/slimgraph/arm64 once

* ``sysroot/``: Debian's python3.11 for arm64 and the libraries it links (``apt-get download`` +
  ``dpkg-deb -x``), the ``-L`` prefix of qemu-aarch64;
* ``site/``: the aarch64 wheels of TVM (runtime only: the 230 MB compiler library is dropped),
  tvm-ffi, numpy, ml_dtypes, sympy, mpmath, typing_extensions, at the versions installed here;
* ``pkg/slimgraph``: links to this installation's slimgraph packages.

:func:`run_python` runs a Python script there, so ``slimgraph.load`` opens an ARM ``model.so``
exactly as it would on a board. Missing host tools raise :class:`TargetError` naming the Debian
package that provides them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from slimgraph.compiler.errors import TargetError

DEFAULT_DIR = Path(os.environ.get("SLIMGRAPH_CACHE", Path.home() / ".cache" / "slimgraph")) / "arm64"
DEBS = ("gcc-12-base libacl1 libbz2-1.0 libc6 libcom-err2 libcrypt1 libdb5.3 libexpat1 libffi8 libgcc-s1 "
        "libgssapi-krb5-2 libk5crypto3 libkeyutils1 libkrb5-3 libkrb5support0 liblzma5 libmd0 libncursesw6 "
        "libnsl2 libpcre2-8-0 libpython3.11-minimal libpython3.11-stdlib libreadline8 libselinux1 "
        "libsqlite3-0 libssl3 libstdc++6 libtinfo6 libtirpc3 libuuid1 libzstd1 python3.11-minimal zlib1g").split()
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "sympy", "mpmath", "typing_extensions")
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
SLIMGRAPH_PACKAGES = ("compiler", "passes", "backends", "models")
TOOLS = {"qemu-aarch64": "qemu-user", "apt-get": "apt", "dpkg-deb": "dpkg"}
PYTHON = "usr/bin/python3.11"


@dataclass(frozen=True)
class Arm64Userland:
    root: Path

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def pkg(self) -> Path:
        return self.root / "pkg"

    def ready(self) -> bool:
        return (self.root / "READY").is_file()


def require_tools() -> None:
    missing = [f"{tool} (Debian package {package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise TargetError(f"running ARM code here needs {', '.join(missing)}",
                          hint="apt-get install qemu-user; see .ci/run")


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise TargetError(f"{what} failed: {' | '.join(tail)}",
                          hint="needs `dpkg --add-architecture arm64 && apt-get update` (see .ci/run)")


def _unpack_debs(sysroot: Path, work: Path) -> None:
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", *(f"{name}:arm64" for name in DEBS)], debs, "apt-get download of arm64 packages")
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(sysroot)], debs, f"unpacking {deb.name}")


def _wheel_pins() -> list[str]:
    """Each wheel at the version installed here (the aarch64 run then matches the x86 one)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]


def _unpack_wheels(site: Path, work: Path) -> None:
    wheels = work / "wheels"
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *platforms,
           "--python-version", "3.11", "-d", str(wheels), *_wheel_pins()]
    _run(cmd, work, "pip download of the aarch64 wheels")
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for heavy in ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty", "tvm/src"):
        path = site / heavy
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for library in site.rglob("*.so*"):
        library.chmod(0o755)


def link_slimgraph(pkg: Path) -> None:
    """``pkg/slimgraph`` mirroring this installation's package layout with symbolic links."""
    import slimgraph

    target = pkg / "slimgraph"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for file in Path(slimgraph.__file__).parent.glob("*.py"):
        (target / file.name).symlink_to(file)
    for name in SLIMGRAPH_PACKAGES:
        (target / name).symlink_to(Path(importlib.import_module(f"slimgraph.{name}").__path__[0]))


def ensure_userland(root: Path = DEFAULT_DIR) -> Arm64Userland:
    """The userland at ``root``, built if it is not there yet (about 400 MB of downloads)."""
    require_tools()
    land = Arm64Userland(Path(root))
    if not land.ready():
        if land.root.exists():
            shutil.rmtree(land.root)
        work = land.root / "downloads"
        _unpack_debs(land.sysroot, work)
        _unpack_wheels(land.site, work)
        shutil.rmtree(work)
        (land.root / "READY").write_text(" ".join(_wheel_pins()) + "\n")
    link_slimgraph(land.pkg)
    return land


def run_python(land: Arm64Userland, script: Path, *args: str, timeout: float = 900,
               cpu: str | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` with the aarch64 Python under qemu (``cpu``: a qemu CPU model such as cortex-a72)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONPATH"] = f"{land.pkg}{os.pathsep}{land.site}"
    env["QEMU_LD_PREFIX"] = str(land.sysroot)
    cmd = ["qemu-aarch64", *(["-cpu", cpu] if cpu else []), str(land.sysroot / PYTHON), str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


if __name__ == "__main__":
    print(ensure_userland().root)

"""Build a C++ kernel of this package on first use and load it through ctypes.

Why not a torch extension: `torch.utils.cpp_extension` needs torch's headers and ninja and takes
a minute per build on a 2-core machine; these kernels take raw pointers, include no torch
header, and build with the machine's own `g++ -O3 -march=native` in under a second
(`EXPERTMESH_MARCH` names another target, e.g. `x86-64-v2` for a cluster of older CPUs, or for
the tests of the vector header's narrower forms). The build lands in `~/.cache/expertmesh`
(`EXPERTMESH_CACHE` moves it), keyed by the source, the shared header (`simd.h`), the
compiler's version, the flags and the CPU's flags, and is renamed into place whole, so that
processes building at once never load half a library. Where there is no compiler, or it
fails, the caller gets None (with one warning) and keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def flags() -> list[str]:
    march = os.environ.get("EXPERTMESH_MARCH") or "native"
    return ["-O3", f"-march={march}", "-shared", "-fPIC", "-std=c++17"]


INCLUDE = Path(__file__).parent  # simd.h: the vector helpers the kernels share
HEADERS = sorted(INCLUDE.glob("*.h"))


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(source: Path, abi: int, cxx: str | None, instead: str) -> ctypes.CDLL | None:
    """The compiled `source` (its `<stem>_abi()` must return `abi`), or None with a warning
    that says what runs `instead`. cxx: the compiler (None: there is none)."""
    name = source.stem
    if cxx is None:
        log.warning("no C++ compiler: %s", instead)
        return None
    try:
        build_flags = flags()
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        key = hashlib.sha256(
            source.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
            + version.stdout.encode() + " ".join(build_flags).encode()
            + _cpu_flags().encode()
        ).hexdigest()[:16]  # fmt: skip
        cache = Path(os.environ.get("EXPERTMESH_CACHE", Path.home() / ".cache" / "expertmesh"))
        cache.mkdir(parents=True, exist_ok=True)
        so = cache / f"{name}-{key}.so"
        if not so.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # rename: never a half .so
                out = Path(tmp) / so.name
                subprocess.run(
                    [cxx, *build_flags, f"-I{INCLUDE}", "-o", str(out), str(source)],
                    check=True, capture_output=True, text=True, timeout=300,
                )  # fmt: skip
                os.replace(out, so)
        lib = ctypes.CDLL(str(so))
        if getattr(lib, f"em_{name}_abi")() != abi:
            raise RuntimeError(f"{so} is not the kernel this module calls")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        log.warning("%s kernel not built (%s %s): %s", name, e, detail, instead)
        return None
    return lib

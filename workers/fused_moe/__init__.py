"""A layer's routed experts in one native call on CPU (fp32 math, fp32 or bf16 weights).

The kernel: `fused_moe.cpp`.

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

`start_swiglu` begins a layer on the kernel's one helper thread and returns at once: the
in-process gateway (`--transport local`) computes its shared experts meanwhile, then joins in
on the experts the helper has not claimed (all of them, if the helper did not get a core, so
the call is never slower than computing it on the caller). The medium checkpoint's local
decode step on 2 cores, in process: 12.4 -> 9.0 / 30.7 -> 20.7 / 48.4 -> 38.3 ms at batch 1 /
8 / 32 in one period, 12.9 -> 11.0 / 30.5 -> 25.0 ms in another, when a second core added 12%
of memory bandwidth (`scripts/bench_bandwidth.py`). The dispatcher uses it for every layer.
`EXPERTMESH_FUSED_MOE_HELPER` = `auto` (a process that may use more than one core), 1 or 0.

Weights may be bfloat16 (a bf16 model's shards): the kernel widens each 16 of them to fp32 in
registers, so a layer reads half the bytes; rows in and out stay fp32 inside the call (a bf16
caller's rows are converted at its edges).

`EXPERTMESH_FUSED_MOE` chooses: `auto` (the default) for float32 and bfloat16 CPU shards in a
process that computes on one torch thread (each expert worker on a small machine, the
in-process gateway here; with more threads oneDNN's parallel matmuls are the better choice,
the kernel has none), `1` whatever the thread count, `0` never. Hidden size and expert widths
must be multiples of 16; other shapes keep the oneDNN path.

`linear` is the down projection's loop alone: a plain x @ w.T on a `block2`-ed weight, for the
gateway's other projections at decode sizes (`router.layers.Projection`: q/k/v, o_proj, lm_head).

Layouts (`block`/`unblock`, exact inverses): w13 [2I, H] (gate rows, then up rows) ->
[I/16, 2, H, 16]; w2 [H, I] -> [H/16, I, 16].
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from expertmesh.ernie import native

SOURCE = Path(__file__).with_name("fused_moe.cpp")
ABI = 4  # em_fused_moe_abi() of the source this module calls


def _setting() -> str:
    return os.environ.get("EXPERTMESH_FUSED_MOE", "auto")


def _compiler() -> str | None:
    return native.compiler()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    lib = native.build(SOURCE, ABI, _compiler(), "the routed experts stay on oneDNN's matmuls")
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    args = [p, i64, i64, p, p, i64, i64, p, p, p, i64, p]
    lib.em_fused_moe_f32.argtypes, lib.em_fused_moe_f32.restype = args, ctypes.c_int
    lib.em_fused_moe_f32_start.argtypes, lib.em_fused_moe_f32_start.restype = args, p
    lib.em_fused_moe_wait.argtypes, lib.em_fused_moe_wait.restype = [p], None
    lib.em_linear_f32.argtypes, lib.em_linear_f32.restype = [p, i64, i64, i64, p, i64, p], None
    return lib


_DTYPES = (torch.float32, torch.bfloat16)  # of the weights; the kernel computes in float32


def usable(
    dtype: torch.dtype, device: str | torch.device, hidden: int, widths: Sequence[int]
) -> bool:
    """Whether experts of these shapes compute through the kernel in this process."""
    setting = _setting()
    if setting == "0" or dtype not in _DTYPES or torch.device(device).type != "cpu":
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
    return _Call(x, local_ids, weights, w13, w2).run()


def start_swiglu(
    x: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
) -> Started:
    """`fused_swiglu` begun on the kernel's helper thread; `.result()` computes what the
    helper has not claimed yet on the calling thread, and returns [N, H]. Meanwhile the
    caller may compute something else (the shared experts), but must not change x."""
    return _Call(x, local_ids, weights, w13, w2).start()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, K] @ dense.T for a weight `block2`-ed from dense [O, K] (float32 or bfloat16), on
    the calling thread -> [N, O] in x's dtype. For a few rows (see `router.layers.Projection`)."""
    lib = library()
    assert lib is not None, "linear without a built kernel"
    if w.dtype not in _DTYPES or w.dim() != 3 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"a blocked [O/16, {x.shape[-1]}, 16] weight, not {tuple(w.shape)}")
    xf = x.to(torch.float32).contiguous()  # [N, K]
    out = torch.empty(xf.shape[0], w.shape[0] * 16)  # [N, O]
    lib.em_linear_f32(
        xf.data_ptr(), xf.shape[0], xf.shape[1], out.shape[1], w.data_ptr(),
        int(w.dtype == torch.bfloat16), out.data_ptr(),
    )  # fmt: skip
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def helper_thread() -> bool:
    """Whether an in-process expert layer should run beside the caller's own work (on the
    kernel's helper thread): `EXPERTMESH_FUSED_MOE_HELPER` 1 / 0, or `auto` (the default):
    when this process may run on more than one core."""
    setting = os.environ.get("EXPERTMESH_FUSED_MOE_HELPER", "auto")
    if setting in ("0", "1"):
        return setting == "1"
    return len(os.sched_getaffinity(0)) > 1 if hasattr(os, "sched_getaffinity") else False


class Started:
    """A kernel call in flight; holds every buffer it reads or writes until it is done."""

    def __init__(self, call: _Call, handle: int):
        self._call, self._handle = call, handle

    def result(self) -> torch.Tensor:
        if self._handle is not None:
            self._call.lib.em_fused_moe_wait(self._handle)
            self._handle = None
        return self._call.result()

    def __del__(self):  # dropped unawaited (the caller failed meanwhile): never free the
        self.result()  # buffers under the helper's feet


class _Call:
    """The arguments of one kernel call, kept alive as long as the call."""

    def __init__(self, x, local_ids, weights, w13, w2):
        self.lib = library()
        assert self.lib is not None, "fused_swiglu without a built kernel"
        self.dtype = x.dtype  # of the result; the kernel reads and writes float32 rows
        self.x = x.to(torch.float32).contiguous()
        self.ids = local_ids.to(torch.int64).contiguous()
        self.topw = weights.to(torch.float32).contiguous()
        self.out = torch.empty_like(self.x)
        self.w13, self.w2 = list(w13), list(w2)  # the weights stay alive with the call
        e = len(w13)
        kinds = {w.dtype for w in (*self.w13, *self.w2)}
        if len(kinds) > 1 or not kinds <= set(_DTYPES):
            raise ValueError(f"expert weights must all be float32 or all bfloat16, not {kinds}")
        self.args = (
            self.x.data_ptr(), self.x.shape[0], self.x.shape[1], self.ids.data_ptr(),
            self.topw.data_ptr(), self.ids.shape[1], e,
            (ctypes.c_void_p * e)(*[w.data_ptr() for w in w13]),
            (ctypes.c_void_p * e)(*[w.data_ptr() for w in w2]),
            (ctypes.c_int64 * e)(*[w.shape[1] for w in w2]),
            int(kinds == {torch.bfloat16}), self.out.data_ptr(),
        )  # fmt: skip

    def _range_error(self) -> ValueError:
        return ValueError(f"expert ids out of range 0..{len(self.w13) - 1}")

    def result(self) -> torch.Tensor:
        return self.out if self.dtype == torch.float32 else self.out.to(self.dtype)

    def run(self) -> torch.Tensor:
        if self.lib.em_fused_moe_f32(*self.args) != 0:
            raise self._range_error()
        return self.result()

    def start(self) -> Started:
        handle = self.lib.em_fused_moe_f32_start(*self.args)
        if handle is None:
            raise self._range_error()
        return Started(self, handle)

"""Linear layers on CPU through oneDNN, with each weight packed once into oneDNN's layout.

Why: a decode step is a chain of matmuls with few rows (1..64 tokens, a handful per expert)
against large weights, so its speed is how fast the weights are read. On CPU, `F.linear` calls
MKL's sgemm, which on AMD EPYC (this project's CPU machines and CI) read them at 8-14 GB/s at
those row counts, against ~45 GB/s of memory bandwidth (likely MKL's CPU dispatch, which
favours Intel's). oneDNN's inner product, with the weight reordered once ahead of time into
its blocked layout, reads them at 30-60 GB/s there: 2-4x faster per matmul at 1-16 rows, bf16
too (measured on [2048, 512] weights, 2 threads). That is what `torch.compile`'s CPU freezing
does for linear layers; here it is done by hand, once. On an Intel Xeon (torch 2.11) the same
measurement was mixed (MKL as fast at 1 row with 2 threads and 2.7x faster with 16; oneDNN
1.4-2.3x faster from 16 rows), so by default the path is taken on AMD CPUs only.

- `packs(w)`, `can_pack(dtype, device)`: whether a weight takes this path (a CPU tensor,
  float32 or bfloat16, a torch built with oneDNN, the path on); elsewhere (CUDA, other
  dtypes, Intel CPUs by default) everything stays on `F.linear`.
- `pack(w)`: the opaque oneDNN copy of a [out, in] weight; `unpack` gives back the dense one.
- `linear(x, w, bias)`: `F.linear` for a dense weight, oneDNN's kernel for a packed one.
- `FusedLinear`: a packed copy of several `nn.Linear` that read the same input (q/k/v, gate/up),
  one matmul instead of several; made on first use and re-made when a weight changes.
- `PackedLinear`: an `nn.Linear` (same parameters, same checkpoint keys) that runs that way.

Results match `F.linear` to float rounding (another summation order: ~1e-6 relative in fp32).
Only under no-grad: the packed kernel has no autograd. `EXPERTMESH_PACKED_LINEAR` chooses:
`1` on, `0` off (A/B measurements, a torch whose oneDNN misbehaves), `auto` (the default) on
for AMD CPUs. It is read once, at import.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = (torch.float32, torch.bfloat16)


def _cpu_vendor() -> str:
    """The CPU's vendor id on Linux ("AuthenticAMD", "GenuineIntel"), else ""."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _enabled(setting: str) -> bool:
    if setting in ("0", "1"):
        return setting == "1"
    return _cpu_vendor() == "AuthenticAMD"  # auto


ENABLED = _enabled(os.environ.get("EXPERTMESH_PACKED_LINEAR", "auto"))


@functools.cache
def _supported(dtype: torch.dtype) -> bool:
    """oneDNN packs and runs this dtype here (bf16 needs AVX-512 BF16 or similar)."""
    if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = pack(torch.ones(8, 8, dtype=dtype))
        return bool(torch.equal(linear(torch.ones(2, 8, dtype=dtype), w), torch.full((2, 8), 8.0)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def can_pack(dtype: torch.dtype, device: str | torch.device) -> bool:
    """Whether weights of this dtype on this device take the packed path."""
    return ENABLED and torch.device(device).type == "cpu" and _supported(dtype)


def packs(w: torch.Tensor) -> bool:
    """Whether `w` (dense, [out, in]) can be packed: CPU, float32/bfloat16, oneDNN."""
    return not w.is_mkldnn and w.dim() == 2 and can_pack(w.dtype, w.device)


def pack(w: torch.Tensor) -> torch.Tensor:
    """w: [out, in] dense -> the same weight in oneDNN's blocked layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous())


def unpack(w: torch.Tensor) -> torch.Tensor:
    """A packed weight's dense [out, in] copy (a dense one is returned as it is)."""
    return w.to_dense() if w.is_mkldnn else w


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., in]; w: [out, in], dense or packed; bias: [out] or None -> [..., out]."""
    if not w.is_mkldnn:
        return F.linear(x, w, bias)
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


class FusedLinear:
    """Several `nn.Linear` over the same input as one packed matmul, outputs side by side.

    `__call__` returns each layer's output (views into one [..., sum of outs] tensor when
    packed). The packed copy is made on the first call on CPU and re-made when any weight or
    bias was replaced or changed in place (a new state dict), so it never goes stale.
    """

    def __init__(self) -> None:
        self._made_from: list[tuple[torch.Tensor, int]] = []  # (param, its version) packed
        self._packed: tuple[torch.Tensor, torch.Tensor | None, list[int]] | None = None

    def __call__(self, x: torch.Tensor, layers: Sequence[nn.Linear]) -> tuple[torch.Tensor, ...]:
        # x: [..., in] -> per layer [..., out_i]
        if torch.is_grad_enabled() or not packs(layers[0].weight):
            return tuple(F.linear(x, m.weight, m.bias) for m in layers)
        w, bias, sizes = self._get(layers)
        y = linear(x, w, bias)  # [..., sum out_i]
        return tuple(y.split(sizes, dim=-1)) if len(sizes) > 1 else (y,)

    def _get(self, layers: Sequence[nn.Linear]):
        params = params_of(layers)
        if self._packed is None or not self._current(params):
            w, bias = joined(layers)
            self._packed = (pack(w), bias, [m.out_features for m in layers])
            self._made_from = made_from(params)
        return self._packed

    def _current(self, params: list[torch.Tensor]) -> bool:
        return still_current(params, self._made_from)


def params_of(layers: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """The weights and biases (where there are) of `layers`: what a joined copy is made from."""
    return [p for m in layers for p in (m.weight, m.bias) if p is not None]


def joined(layers: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layers over the same input as one: weight [sum out_i, in] and bias [sum out_i] (zeros
    for a layer without one; None where none has one), dense copies."""
    w = torch.cat([m.weight.detach() for m in layers])  # [sum out_i, in]
    if all(m.bias is None for m in layers):
        return w, None
    zeros = [w.new_zeros(m.out_features) for m in layers]
    return w, torch.cat([z if m.bias is None else m.bias.detach() for m, z in zip(layers, zeros)])


def version_of(t: torch.Tensor) -> int:
    """In-place changes bump a tensor's version; an inference tensor has none (-1)."""
    return -1 if t.is_inference() else t._version


def made_from(params: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """What a derived copy (packed, blocked) is made from: each tensor and its version. It
    holds them, so their ids stay unique while the copy lives."""
    return [(p, version_of(p)) for p in params]


def still_current(params: Sequence[torch.Tensor], made: list[tuple[torch.Tensor, int]]) -> bool:
    """Whether a copy `made_from` some tensors is still theirs: none replaced or changed."""
    return len(params) == len(made) and all(
        p is q and version_of(p) == v for p, (q, v) in zip(params, made)
    )


class PackedLinear(nn.Linear):
    """`nn.Linear` through the packed kernel on CPU under no-grad (`F.linear` elsewhere).

    The parameters stay dense and as named; the packed copy sits beside them (one more copy of
    the weight in CPU memory)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed = FusedLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        return self._packed(x, (self,))[0]


if ENABLED:  # oneDNN's one-time set-up (~8 MB: code, JIT buffers) with the import, not the load
    _supported(torch.float32)

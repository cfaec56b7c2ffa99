"""A decode step's attention in one native call per layer on CPU: `decode_attention.cpp`.

Why: in a step where every sequence decodes one token, torch spends ~40 ops per layer around
the attention itself (rotary through complex views, the cache writes, copying each sequence's
padded context out of the paged cache, the mask, SDPA, reshapes): ~250 us per layer at batch
1 on a 2-core machine, where the layer's q/k/v/o weights stream in ~80 us, and 0.5-1 ms a layer
at batch 32 of 128-token contexts (`python scripts/bench_decode_attention.py`). The kernel
rotates q and k, writes k and v to their cache slots and attends over each context where it
lies in the cache, on the calling thread, with the GIL released (ctypes).

fp32 or bf16 (q, k, v and the KV cache alike; the math is fp32, bf16 keys are rounded to the
cache as torch rounds them). `EXPERTMESH_DECODE_ATTENTION` chooses: `auto` (the default) on
CPU in a process that computes on one torch thread (the gateway on a small machine; the
kernel has no threads of its own, torch's SDPA spreads over many), `1` whatever the thread
count, `0` never. Steps with a prompt chunk, other dtypes and GPUs keep the torch path
(`layers.Attention`). It is built like the fused-MoE kernel (`ernie/native.py`), when the
gateway's model loads.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch
from expertmesh.ernie import native

SOURCE = Path(__file__).with_name("decode_attention.cpp")
ABI = 2  # em_decode_attention_abi() of the source this module calls


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    lib = native.build(SOURCE, ABI, native.compiler(), "decode attention stays on torch's SDPA")
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.em_decode_attention.argtypes = [
        i64, i64, i64, i64, p, i64, p, i64, p, i64, p, p, p, p, i64, p, i64, i64, p,
        ctypes.c_float, i64, p,
    ]  # fmt: skip
    lib.em_decode_attention.restype = ctypes.c_int
    return lib


_DTYPES = (torch.float32, torch.bfloat16)  # of q, k, v and the caches; the math is fp32


def usable(dtype: torch.dtype, device: str | torch.device) -> bool:
    """Whether a decode step's attention of this dtype computes through the kernel here."""
    setting = os.environ.get("EXPERTMESH_DECODE_ATTENTION", "auto")
    if setting == "0" or dtype not in _DTYPES or torch.device(device).type != "cpu":
        return False
    if setting != "1" and torch.get_num_threads() != 1:
        return False
    return library() is not None


def _rows(x: torch.Tensor, heads: int, d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(pointer, row stride) of x [T, heads * d] whose rows may be views into a wider tensor."""
    if x.dtype != dtype or x.dim() != 2 or x.shape[1] != heads * d or x.stride(1) != 1:
        raise ValueError(
            f"expected {dtype} rows of {heads * d} contiguous values, got {x.dtype} {x.shape}"
        )
    return x.data_ptr(), x.stride(0)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rot: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_blocks: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """One query per sequence: q [T, hq*D], k, v [T, hkv*D] (row views of the qkv projection
    are fine); rot [T, 1, D/2] complex64 (`layers.rotation`); slot_mapping [T]; caches
    [slots, hkv, D], written in place; q, k, v and caches all fp32 or all bf16 (the math is
    fp32 either way, the result has their dtype); kv_blocks [T, nblk]; context_lens [T] (each
    query's position + 1) -> [T, hq, D], as rotary + cache writes + causal SDPA give."""
    lib = library()
    assert lib is not None, "decode_attention without a built kernel"
    slots, hkv, d = k_cache.shape
    hq = q.shape[1] // d
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or v_cache.shape != k_cache.shape:
        raise ValueError("caches must be contiguous [slots, kv_heads, D] alike")
    dtype = k_cache.dtype
    if dtype not in _DTYPES or v_cache.dtype != dtype:
        raise ValueError(f"caches must be both float32 or both bfloat16, not {dtype}")
    t = q.shape[0]
    rot = torch.view_as_real(rot).contiguous()  # [T, 1, D/2, 2]
    if rot.shape != (t, 1, d // 2, 2):
        raise ValueError(f"rot {tuple(rot.shape[:-1])} does not fit {t} tokens of D={d}")
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    kv_blocks = kv_blocks.to(torch.int64).contiguous()
    context_lens = context_lens.to(torch.int64).contiguous()
    if slot_mapping.shape != (t,) or context_lens.shape != (t,) or kv_blocks.shape[0] != t:
        raise ValueError("slot_mapping, context_lens and kv_blocks need one row per query")
    out = torch.empty(t, hq, d, dtype=torch.float32)
    err = lib.em_decode_attention(
        t, hq, hkv, d, *_rows(q, hq, d, dtype), *_rows(k, hkv, d, dtype),
        *_rows(v, hkv, d, dtype), rot.data_ptr(), slot_mapping.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), slots, kv_blocks.data_ptr(), kv_blocks.shape[1], block_size,
        context_lens.data_ptr(), d**-0.5, int(dtype == torch.bfloat16), out.data_ptr(),
    )  # fmt: skip
    if err:
        raise ValueError("decode attention: a slot, cache block or context length out of range")
    return out if dtype == torch.float32 else out.to(dtype)

"""The gateway's model math outside the routed experts: norms, rotary, attention, dense MLP.

Plain torch modules. Parameter names follow the Hub checkpoint's keys so that loading is
a matter of reading each parameter's own name. No communication happens here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.packed_linear import (
    FusedLinear,
    PackedLinear,
    joined,
    made_from,
    params_of,
    still_current,
)
from expertmesh.workers import fused_moe
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import decode_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; the variance in fp32, as the reference does
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one op, same math
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """ERNIE's rotary embedding: rotates interleaved pairs (x[2i], x[2i+1]) by pos * f_i."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, D/2] in fp32
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos()[:, None, :], freqs.sin()[:, None, :]


def rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos, sin: [T, 1, D/2] -> the same rotations as unit complex numbers [T, 1, D/2]
    (complex64), made once per step for every layer's `apply_rotary`."""
    return torch.complex(cos.float(), sin.float())


def apply_rotary(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D], pairs (x[2i], x[2i+1]) adjacent; rot: [T, 1, D/2] complex64.
    # (x0 + i x1)(cos + i sin) = (x0 cos - x1 sin) + i (x1 cos + x0 sin), in fp32: one complex
    # multiply rather than a dozen elementwise ops (a decode step is short of compute, not of ops)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [T, heads, D/2]
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


class Projection:
    """Several `nn.Linear` over one input (q, k, v; or one: o_proj, lm_head) as one matmul.

    Up to `KERNEL_ROWS` rows, where the fused-MoE kernel applies (`fused_moe.usable`), through
    its plain linear on a blocked copy of the weights, read at 16-18 GB/s where oneDNN's packed
    matmul reads them at 10-13 (an AVX2 EPYC, 1 thread, [768, 512] to [512, 2048] weights not in
    cache: 1.3-1.4x at 1 row, 1.6-1.8x at 4, 1.2-1.3x at 8, 1.05-1.15x at 16, 0.9x at 32).
    Otherwise `FusedLinear` (oneDNN, or `F.linear`). The blocked copy is made on first use
    and re-made when a weight changes; the outputs are views into one [T, sum of outs]."""

    KERNEL_ROWS = 16

    def __init__(self) -> None:
        self._fused = FusedLinear()
        self._blocked: tuple | None = None  # (w [O/16, K, 16], bias, sizes, made_from)

    def __call__(self, x: torch.Tensor, layers: Sequence[nn.Linear]) -> tuple[torch.Tensor, ...]:
        # x: [T, K] -> per layer [T, out_i]
        if x.dim() == 2 and x.shape[0] <= self.KERNEL_ROWS and not torch.is_grad_enabled():
            blocked = self._kernel_weights(layers)
            if blocked is not None:
                w, bias, sizes = blocked
                y = fused_moe.linear(x, w)  # [T, sum out_i]
                if bias is not None:
                    y += bias
                return tuple(y.split(sizes, dim=-1)) if len(sizes) > 1 else (y,)
        return self._fused(x, layers)

    def _kernel_weights(self, layers: Sequence[nn.Linear]) -> tuple | None:
        w0 = layers[0].weight
        sizes = [m.out_features for m in layers]
        # any input width K: only the outputs come in blocks of 16 (`hidden` 16 passes)
        if not fused_moe.usable(w0.dtype, w0.device, 16, [sum(sizes)]):
            return None
        params = params_of(layers)
        if self._blocked is None or not still_current(params, self._blocked[3]):
            w, bias = joined(layers)  # [sum out_i, K], [sum out_i] or None
            self._blocked = (fused_moe.block2(w), bias, sizes, made_from(params))
        return self._blocked[:3]


class ProjectedLinear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint keys) through `Projection`: the kernel up
    to its rows, oneDNN's packed matmul above them (`F.linear` off CPU, or under grad)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._projection = Projection()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out], as rows [T, in]
        y = self._projection(x.reshape(-1, self.in_features), (self,))[0]  # [T, out]
        return y.reshape(*x.shape[:-1], self.out_features)


class MLP(nn.Module):
    """SwiGLU: dense layers and the shared experts. On CPU gate and up run as one packed
    matmul (`FusedLinear`); the parameters keep the checkpoint's names and layout.

    Up to `KERNEL_ROWS` rows, where the fused-MoE kernel applies (CPU, fp32 or bf16, one torch
    thread: `fused_moe.usable`), the whole SwiGLU is one kernel call instead, as an expert that
    every row goes to with weight 1: it reads the weights at ~20 GB/s where oneDNN's packed
    matmuls read them at ~12 (an AVX2 EPYC, 1 thread, hidden 512, width 2048: 1.36x at 1 row,
    1.39x at 8, 1.09x at 16, 0.92x at 24, 0.79x at 64). Its blocked copy of the weights is made
    on first use and re-made when a weight changes."""

    KERNEL_ROWS = 16

    def __init__(self, hidden: int, inter: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = PackedLinear(inter, hidden, bias=bias)
        self._gate_up = FusedLinear()
        self._blocked: tuple | None = None  # (w13, w2, [(param, version)]) for the kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> gate, up: [T, I] -> [T, H]
        if x.dim() == 2 and x.shape[0] <= self.KERNEL_ROWS and not torch.is_grad_enabled():
            blocked = self._kernel_weights()
            if blocked is not None:
                every = torch.zeros(x.shape[0], 1, dtype=torch.int64)  # [T, 1] expert 0
                return fused_moe.fused_swiglu(x, every, torch.ones(x.shape[0], 1), *blocked)
        gate, up = self._gate_up(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)

    def _kernel_weights(self) -> tuple[list, list] | None:
        """([w13 blocked], [w2 blocked]) where the kernel takes this MLP here, else None."""
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        w = gate.weight
        if gate.bias is not None or not fused_moe.usable(
            w.dtype, w.device, gate.in_features, [gate.out_features]
        ):
            return None
        params = params_of((gate, up, down))  # no biases here
        if self._blocked is None or not still_current(params, self._blocked[2]):
            w13, _ = joined((gate, up))  # [2I, H]
            w2 = down.weight.detach()  # [H, I]
            self._blocked = ([fused_moe.block13(w13)], [fused_moe.block2(w2)], made_from(params))
        return self._blocked[0], self._blocked[1]


@dataclass
class AttnGroup:
    """Sequences of a step whose attention is one padded SDPA call: Bg sequences, Qmax the
    most new tokens of one of them, Lmax the longest context (cached + new)."""

    q_index: torch.Tensor  # [Bg, Qmax] index into T (padding points at a real token)
    q_valid: torch.Tensor  # [Bg, Qmax] bool
    kv_blocks: torch.Tensor  # [Bg, nblk] cache blocks of each sequence's context
    block_size: int  # Lmax = nblk * block_size: keys past a sequence's context are masked
    mask: torch.Tensor  # [Bg, 1, Qmax, Lmax] bool, True where attention is allowed
    tokens: torch.Tensor | None  # [Tg] = q_index[q_valid]; None: the group is all T, in order
    decode: bool = False  # one new token per sequence (Qmax == 1): no gather, no scatter back
    context_lens: torch.Tensor | None = None  # [Bg] keys each sequence's last query sees


@dataclass
class AttnMeta:
    """Where a step's tokens sit in the paged KV cache; built once per step, used by all layers.

    The step's T tokens are ordered by sequence (B sequences); `groups` split them for
    attention (decoding sequences apart from prompt chunks, `attention_metadata.build_step`).
    """

    positions: torch.Tensor  # [T] position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] cache slot where each token's k/v is written
    last_index: torch.Tensor  # [B] index into T of each sequence's last token this step
    groups: list[AttnGroup]
    # [R] the rows that get logits, where not last_index alone (prompt logprobs: all of a chunk)
    logit_index: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, b = cfg.hidden_size, cfg.use_bias
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=b)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=b)
        self.o_proj = ProjectedLinear(self.heads * self.head_dim, h, bias=b)
        self._qkv = Projection()  # on CPU q, k and v as one matmul

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMeta,
    ) -> torch.Tensor:
        # x: [T, H]; k_cache, v_cache: [slots, kv_heads, D] of this layer
        t = x.shape[0]
        q, k, v = self._qkv(x, (self.q_proj, self.k_proj, self.v_proj))  # [T, heads*D], ...
        g = meta.groups[0]
        if (  # every sequence decodes: one native call
            g.decode and g.tokens is None and k_cache.dtype == q.dtype
            and decode_attention.usable(q.dtype, q.device)
        ):  # fmt: skip
            out = decode_attention.decode_attention(
                q, k, v, rope, meta.slot_mapping, k_cache, v_cache,
                g.kv_blocks, g.context_lens, g.block_size,
            )  # fmt: skip
            return self.o_proj(out.reshape(t, self.heads * self.head_dim))  # [T, H]
        q = q.reshape(t, self.heads, self.head_dim)
        k = k.reshape(t, self.kv_heads, self.head_dim)
        v = v.reshape(t, self.kv_heads, self.head_dim)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)  # rope: `rotation`'s [T, 1, D/2]
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

        if meta.groups[0].tokens is None:  # one group: every token, in order
            out = self._attend(q, k_cache, v_cache, meta.groups[0])  # [T, heads, D]
        else:
            out = q.new_empty(q.shape)  # [T, heads, D]
            for g in meta.groups:
                out[g.tokens] = self._attend(q, k_cache, v_cache, g)
        return self.o_proj(out.reshape(t, self.heads * self.head_dim))  # [T, H]

    def _attend(self, q, k_cache, v_cache, g: AttnGroup) -> torch.Tensor:
        # q: [T, heads, D] -> [Tg, heads, D], the group's tokens in q_valid order
        if g.decode:  # one query per sequence: its token, no padding
            qp = (q if g.tokens is None else q[g.tokens])[:, :, None]  # [Bg, heads, 1, D]
        else:
            qp = q[g.q_index].transpose(1, 2)  # [Bg, heads, Qmax, D]
        kp, vp = _context(k_cache, g).to(q.dtype), _context(v_cache, g).to(q.dtype)
        with _sdpa_backends(qp.device):
            out = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=g.mask, enable_gqa=self.heads != self.kv_heads
            )  # [Bg, heads, Qmax, D]
        if g.decode:
            return out[:, :, 0]  # [Bg, heads, D]
        return out.transpose(1, 2)[g.q_valid]  # [Tg, heads, D]


def _context(cache: torch.Tensor, g: AttnGroup) -> torch.Tensor:
    """cache: [slots, kv_heads, D] -> the group's contexts [Bg, kv_heads, Lmax, D].

    Copied by whole blocks (one index_select of [block_size, kv_heads, D] rows): on CPU 43
    against 176 us per layer and tensor slot by slot (batch 32, context 128, one thread)."""
    blocks = cache.view(-1, g.block_size, *cache.shape[1:])  # [N, bs, kv_heads, D]
    ctx = blocks.index_select(0, g.kv_blocks.flatten())  # [Bg * nblk, bs, kv_heads, D]
    return ctx.view(g.kv_blocks.shape[0], -1, *cache.shape[1:]).transpose(1, 2)


# On CUDA with a boolean mask, SDPA picks cuDNN, whose per-call host cost (measured on an H100:
# ~14 ms per call as the context length changes each step, against 0.01 ms of GPU work) made
# the decode step host-bound; the memory-efficient kernel takes the same mask without it.
_CUDA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def _sdpa_backends(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(_CUDA_BACKENDS)

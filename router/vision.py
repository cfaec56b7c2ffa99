"""ERNIE-4.5-VL's image encoder on the gateway: the vision transformer and the resampler.

The vision transformer embeds 14x14 patches (as `ernie/image.py` cuts them), rotates queries
and keys by each patch's (row, column) with a 2D axial rotary, and attends within each image
(each frame of a video); the resampler merges each 2x2 block of patches into one token, folds
time pairs, and projects to the language model's width. One image of grid (t, h, w) becomes
t*h*w/4 tokens. Module names follow the Hub keys (`model.vision_model.*`,
`model.resampler_model.*`) so loading reads each parameter by its own name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from expertmesh.ernie.config import VisionConfig
from torch import nn

from .layers import RMSNorm

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, column) of every patch [N, 2], in the merge-block order the patches come in."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        block = (h // merge, merge, w // merge, merge)
        rc = [a.reshape(block).transpose(1, 2).flatten() for a in (rows, cols)]
        out.append(torch.stack(rc, dim=-1).repeat(t, 1))  # [t*h*w, 2]
    return torch.cat(out)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope, lengths: list[int]) -> torch.Tensor:
        # x: [N, d]; rope: cos, sin [N, 1, hd]; attention within each run of `lengths` rows
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).unbind(1)  # [N, heads, hd]
        cos, sin = rope
        q, k = ((t.float() * cos + rotate_half(t.float()) * sin).to(x.dtype) for t in (q, k))
        outs = [
            F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in qkv))[0]
            for qkv in zip(*(t.split(lengths) for t in (q, k, v)))
        ]  # each [heads, n_i, hd]
        out = torch.cat(outs, dim=1).transpose(0, 1)  # [N, heads, hd]
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1, self.norm2 = nn.LayerNorm(d, cfg.eps), nn.LayerNorm(d, cfg.eps)
        self.attn = VisionAttention(d, cfg.num_heads)
        self.mlp = VisionMLP(d, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, rope, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.in_channels * cfg.patch_size**2, cfg.hidden_size, bias=False)


def axial_inv_freq(cfg: VisionConfig) -> torch.Tensor:
    """[head_dim/4]: each axis (row, column) rotates half of a head's pairs."""
    half = cfg.hidden_size // cfg.num_heads // 2
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))


class VisionTower(nn.Module):
    """Patches [N, C*p*p] -> patch features [N, d]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merge = cfg.spatial_merge_size
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.hidden_size, cfg.eps)
        self.register_buffer("inv_freq", axial_inv_freq(cfg), persistent=False)  # [hd/4]

    def rope(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = patch_positions(grid_thw, self.merge).to(self.inv_freq.device)  # [N, 2]
        freqs = (pos[:, :, None].float() * self.inv_freq).flatten(1)  # [N, hd/2]: rows, cols
        freqs = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, hd]
        return freqs.cos(), freqs.sin()

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixels.to(self.patch_embed.proj.weight.dtype))  # [N, d]
        rope = self.rope(grid_thw)
        lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]  # one per frame
        for block in self.blocks:
            x = block(x, rope, lengths)
        return self.ln(x)


def _projection(inp: int, out: int, eps: float) -> nn.Sequential:
    # keys .0 (linear), .2 (linear), .3 (LayerNorm), as the Hub names them
    return nn.Sequential(
        nn.Linear(inp, out), nn.GELU(), nn.Linear(out, out), nn.LayerNorm(out, eps)
    )


class Resampler(nn.Module):
    """Patch features [N, d] -> image tokens [N / merge^2, hidden] for the language model."""

    def __init__(self, cfg: VisionConfig, hidden: int, rms_eps: float):
        super().__init__()
        self.merge, self.temporal = cfg.spatial_merge_size, cfg.temporal_merge_size
        spatial = cfg.hidden_size * self.merge**2
        self.spatial_linear = _projection(spatial, spatial, cfg.eps)
        self.temporal_linear = _projection(spatial * self.temporal, spatial, cfg.eps)
        self.mlp = nn.Linear(spatial, hidden)
        self.after_norm = RMSNorm(hidden, rms_eps)

    def forward(self, x: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.spatial_linear(x.reshape(-1, x.shape[-1] * self.merge**2))  # [N/m^2, S]
        x = self.temporal_linear(self._time_pairs(x, grid_thw))  # [tokens, S]
        return self.after_norm(self.mlp(x))  # [tokens, hidden]

    def _time_pairs(self, x: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Frames (0, 1), (2, 3), ... side by side; an image (t = 1) beside itself: [., 2S]."""
        first, second, offset = [], [], 0
        for t, h, w in grid_thw.tolist():
            s = h * w // self.merge**2  # tokens per frame
            for f, g in zip(range(0, t, 2), range(1 if t > 1 else 0, t, 2)):
                first.append(torch.arange(offset + f * s, offset + (f + 1) * s))
                second.append(torch.arange(offset + g * s, offset + (g + 1) * s))
            offset += t * s
        a, b = torch.cat(first).to(x.device), torch.cat(second).to(x.device)
        return torch.cat((x[a], x[b]), dim=-1)

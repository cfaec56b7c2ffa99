"""3D rotary positions of ERNIE-4.5-VL: every token has a (t, h, w) position.

Text tokens have t = h = w (so a text-only sequence rotates exactly as the text model does);
an image's tokens sit on its merged patch grid, offset by where the image starts, and the text
after it resumes past the grid's longer side. transformers precomputes a permuted frequency
table; the same rotation, written out: rotary pair j (of head_dim/2) turns by
pos[axis(j)] * inv_freq[j], where, with mrope_section = [n, n, m], the first 2n pairs
alternate h, w, h, w, ... and the last m pairs take t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

T, H, W = 0, 1, 2  # rows of a [3, L] position tensor


class MRotary(nn.Module):
    """ERNIE-4.5-VL's rotary embedding over (t, h, w) positions; pairs are interleaved."""

    def __init__(self, head_dim: int, theta: float, section: Sequence[int]):
        super().__init__()
        half = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        axis = torch.full((half,), T, dtype=torch.long)
        hw = section[0] + section[1]
        axis[0:hw:2], axis[1:hw:2] = H, W
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2]
        self.register_buffer("axis", axis, persistent=False)  # [D/2] which position each pair uses

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] (text: every axis the same) or [3, T] -> cos, sin: [T, 1, D/2] fp32
        if positions.dim() == 1:
            positions = positions.expand(3, -1)
        pos = positions.float()[self.axis]  # [D/2, T]
        freqs = pos.t() * self.inv_freq[None, :]  # [T, D/2]
        return freqs.cos()[:, None, :], freqs.sin()[:, None, :]


def prompt_positions(
    ids: Sequence[int], image_token_id: int, grids: Sequence[Sequence[int]], merge: int
) -> tuple[torch.Tensor, int]:
    """Rope positions [3, L] of an expanded prompt, and the offset (position - index) of every
    token after it. `grids`: (t, h, w) in patches of each image, in prompt order; each image's
    tokens are the next t*h*w/merge^2 placeholders."""
    parts: list[torch.Tensor] = []
    pos, i, images = 0, 0, iter(grids)
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            parts.append(torch.arange(pos, pos + j - i).expand(3, -1))  # [3, n] text
            pos, i = pos + j - i, j
            continue
        t, h, w = next(images)
        gh, gw = h // merge, w // merge
        grid = torch.stack(
            torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        ).reshape(3, -1)  # [3, t*gh*gw]
        if any(x != image_token_id for x in ids[i : i + grid.shape[1]]):
            raise ValueError("an image's placeholders are fewer than its grid's tokens")
        parts.append(grid + pos)
        pos, i = pos + max(gh, gw), i + grid.shape[1]
    if not parts:
        return torch.zeros(3, 0, dtype=torch.long), 0
    positions = torch.cat(parts, dim=1)
    return positions, int(positions.max()) + 1 - len(ids)  # as transformers' rope_deltas

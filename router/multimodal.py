"""Image requests on the engine side: what a VL prompt carries, and what a step needs of it.

A request brings a prompt with one image placeholder per image (between the image start and
end tokens) and the images. When it is added, each placeholder becomes that image's token count
(as transformers' processor expands it), and the prompt's 3D rope positions and vision-routed
tokens (placeholders, image start and end) are fixed. The images are encoded when a prefill
step first reaches one of their tokens (once per request, so a chunked prefill takes slices)
and dropped when the prompt is done. Generated tokens are text: rope position = index + delta,
routed to the text experts, as transformers' generate treats them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.image import ImageInputs, expand_placeholders

from .mrope import prompt_positions
from .scheduler import ScheduledSeq

Encoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # pixels, grid_thw -> [n, H]


@dataclass
class MultimodalPrompt:
    """A VL request's prompt beyond its ids; made once, when the request is added."""

    vision: torch.Tensor  # [L] bool: prompt tokens routed to the vision experts
    positions: torch.Tensor  # [3, L] (t, h, w) rope positions of the prompt
    delta: int  # rope position minus index, for every token after the prompt
    image_rows: torch.Tensor  # [n] prompt indices of the image tokens, in image order
    images: ImageInputs | None  # the pixels, until they are encoded
    embeds: torch.Tensor | None = None  # [n, H] image tokens, while the prompt is prefilled

    @property
    def length(self) -> int:
        return self.vision.shape[0]

    def rope(self, start: int, end: int) -> torch.Tensor:
        """Positions [3, end - start] of tokens start..end-1 (past the prompt too)."""
        inside = self.positions[:, start : min(end, self.length)]
        after = torch.arange(max(start, self.length), max(end, self.length)) + self.delta
        return torch.cat((inside, after.expand(3, -1)), dim=1)

    def vision_of(self, start: int, end: int) -> torch.Tensor:
        """Tokens start..end-1 that go to the vision experts [end - start] (none past the prompt)."""
        inside = self.vision[start : min(end, self.length)]
        return torch.cat((inside, torch.zeros(end - start - inside.shape[0], dtype=bool)))


@dataclass
class MultimodalStep:
    """What a step of a VL model needs beyond token ids (T tokens ordered by sequence)."""

    rope_positions: torch.Tensor  # [3, T]
    vision: torch.Tensor | None  # [T] bool; None when no token this step is a vision token
    image_rows: torch.Tensor | None  # [m] index into T of this step's image tokens
    image_embeds: torch.Tensor | None  # [m, H] their embeddings


def multimodal_prompt(
    ids: Sequence[int], cfg: ModelConfig, images: ImageInputs | None
) -> tuple[list[int], MultimodalPrompt | None]:
    """The expanded prompt and its state; (ids, None) for a prompt without images or vision
    tokens. Raises ValueError when the placeholders and the images do not pair up."""
    v = cfg.vision
    ids = list(ids)
    if v is None:
        if images is not None:
            raise ValueError("this model takes no images")
        return ids, None
    if images is None and not set(ids) & set(v.vision_token_ids):
        return ids, None
    merge = v.spatial_merge_size
    if images is not None:
        _check_images(images, cfg)
    counts = images.tokens_per_image(merge) if images is not None else []
    ids = expand_placeholders(ids, v.image_token_id, counts)
    grids = images.grid_thw.tolist() if images is not None else []
    positions, delta = prompt_positions(ids, v.image_token_id, grids, merge)
    t = torch.tensor(ids)
    vision = torch.isin(t, torch.tensor(v.vision_token_ids))
    rows = (t == v.image_token_id).nonzero().squeeze(-1)
    return ids, MultimodalPrompt(vision, positions, delta, rows, images)


def _check_images(images: ImageInputs, cfg: ModelConfig) -> None:
    """Refuse inputs the vision tower cannot take (it would fail mid-step, for every request)."""
    v = cfg.vision
    grid, pixels = images.grid_thw, images.pixel_values
    width = v.in_channels * v.patch_size**2
    if grid.dim() != 2 or grid.shape[1] != 3 or not len(grid) or (grid <= 0).any():
        raise ValueError("image_grid_thw must be [images, 3] of positive (t, h, w)")
    if (grid[:, 0] != 1).any() or (grid[:, 1:] % v.spatial_merge_size).any():
        raise ValueError(f"images have t = 1 and h, w multiples of {v.spatial_merge_size}")
    if tuple(pixels.shape) != (int(grid.prod(-1).sum()), width):
        raise ValueError(
            f"pixel_values has shape {list(pixels.shape)}; the grids need "
            f"[{int(grid.prod(-1).sum())}, {width}]"
        )


def build_multimodal_step(
    plan: list[ScheduledSeq],
    prompt_of: Callable[[str], MultimodalPrompt | None],
    encode: Encoder,
    device: torch.device | str,
) -> MultimodalStep | None:
    """The step's MultimodalStep; None when no sequence in it has one (a text-only step)."""
    prompts = [prompt_of(s.seq.seq_id) for s in plan]
    if all(p is None for p in prompts):
        return None
    pos, vis, rows, embeds, offset = [], [], [], [], 0
    for s, p in zip(plan, prompts):
        start, end = s.seq.num_computed, s.seq.num_computed + s.num_tokens
        if p is None:
            pos.append(torch.arange(start, end).expand(3, -1))
            vis.append(torch.zeros(end - start, dtype=bool))
        else:
            pos.append(p.rope(start, end))
            vis.append(p.vision_of(start, end))
            sel = (p.image_rows >= start) & (p.image_rows < end)  # [n]
            if sel.any():
                if p.embeds is None:
                    p.embeds = encode(p.images.pixel_values, p.images.grid_thw)  # [n, H]
                    p.images = None
                rows.append(p.image_rows[sel] - start + offset)
                embeds.append(p.embeds[sel.to(p.embeds.device)])
            if end >= p.length:  # the prompt is done: its images are no longer needed
                p.embeds, p.images = None, None
        offset += end - start
    vision = torch.cat(vis)
    return MultimodalStep(
        rope_positions=torch.cat(pos, dim=1).to(device),
        vision=vision.to(device) if vision.any() else None,
        image_rows=torch.cat(rows).to(device) if rows else None,
        image_embeds=torch.cat(embeds) if embeds else None,
    )

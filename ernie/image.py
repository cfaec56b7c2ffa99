"""Image preprocessing of ERNIE-4.5-VL, as transformers' `Ernie4_5_VLMoeImageProcessorPil` does it.

With PIL and numpy only (torchvision does not import beside this torch): convert to RGB (alpha
over white), resize to multiples of patch_size * merge_size within [min_pixels, max_pixels],
rescale, normalise, and cut into patches ordered merge-block by merge-block, each patch
flattened channel-first. The settings come from the checkpoint's `preprocessor_config.json`
whatever processor class it names (the Hub names the torchvision one; the math is the same).

Also here, because the ingress and the engine both need it: how many tokens an image becomes
(grid t*h*w / merge^2) and the expansion of one placeholder per image into that many, as
transformers' `Ernie4_5_VLMoeProcessor` expands them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


@dataclass(frozen=True)
class ImageSettings:
    """The image processor's settings; defaults are transformers' for ERNIE-4.5-VL."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 6177
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 1
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dir(cls, path: str | Path) -> ImageSettings:
        """From `preprocessor_config.json` in the checkpoint directory; defaults without one."""
        f = Path(path) / "preprocessor_config.json"
        return cls.from_dict(json.loads(f.read_text())) if f.is_file() else cls()

    @classmethod
    def from_dict(cls, raw: dict) -> ImageSettings:
        """`size: {shortest_edge, longest_edge}` (min and max pixels) or `min_pixels`/`max_pixels`."""
        size = raw.get("size") or {}
        kw = {f.name: raw[f.name] for f in fields(cls) if raw.get(f.name) is not None}
        kw.setdefault("min_pixels", size.get("shortest_edge", cls.min_pixels))
        kw.setdefault("max_pixels", size.get("longest_edge", cls.max_pixels))
        for name in ("image_mean", "image_std"):
            v = kw.get(name)
            if v is not None:
                kw[name] = tuple(float(x) for x in (v if isinstance(v, list) else [v] * 3))
        return cls(**kw)


@dataclass
class ImageInputs:
    """Preprocessed images: what the vision tower takes."""

    pixel_values: torch.Tensor  # [patches, C * temporal_patch * patch * patch] fp32
    grid_thw: torch.Tensor  # [images, 3] (t, h, w) in patches, int64

    def tokens_per_image(self, merge_size: int) -> list[int]:
        return [t * h * w // merge_size**2 for t, h, w in self.grid_thw.tolist()]

    @classmethod
    def concat(cls, parts: Sequence[ImageInputs]) -> ImageInputs:
        return cls(
            torch.cat([p.pixel_values for p in parts]), torch.cat([p.grid_thw for p in parts])
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """(h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"an image's aspect ratio must be below 200, got {max(height, width) / min(height, width)}"
        )
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _rgb(image):
    """PIL image -> RGB uint8 array [H, W, 3]; transparency is composited over white."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def _one(image, s: ImageSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One PIL image -> patches [gh*gw, C*tp*p*p] (float32) and its grid (1, gh, gw)."""
    from PIL import Image

    arr = _rgb(image) if s.do_convert_rgb else np.array(image)  # [H, W, C] uint8
    if s.do_resize:
        factor = s.patch_size * s.merge_size
        h, w = smart_resize(*arr.shape[:2], factor, s.min_pixels, s.max_pixels)
        arr = np.array(Image.fromarray(arr).resize((w, h), resample=s.resample))
    x = np.moveaxis(arr, -1, 0)  # [C, H, W]
    if s.do_rescale:
        x = (x.astype(np.float64) * s.rescale_factor).astype(np.float32)
    x = x.astype(np.float32)
    if s.do_normalize:
        mean = np.array(s.image_mean, dtype=np.float32)[:, None, None]
        std = np.array(s.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return _patchify(x, s)


def _patchify(x: np.ndarray, s: ImageSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    # x: [C, H, W] -> [gh*gw, C*tp*p*p], patches grouped by merge block (gh/m, gw/m, m, m)
    c, height, width = x.shape
    p, m, tp = s.patch_size, s.merge_size, s.temporal_patch_size
    gh, gw = height // p, width // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))  # repeat in time
    return np.ascontiguousarray(x).reshape(gh * gw, c * tp * p * p), (1, gh, gw)


def preprocess(images: Sequence, settings: ImageSettings) -> ImageInputs:
    """PIL images -> ImageInputs, in order."""
    from PIL import Image

    if not images:
        raise ValueError("no images to preprocess")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ValueError(f"image {i} is a {type(im).__name__}, not a PIL image")
    patches, grids = zip(*(_one(im, settings) for im in images))
    return ImageInputs(
        torch.from_numpy(np.concatenate(patches)), torch.tensor(grids, dtype=torch.long)
    )


def expand_placeholders(ids: Sequence[int], placeholder: int, counts: Sequence[int]) -> list[int]:
    """Each `placeholder` in `ids` repeated counts[i] times (i-th placeholder, i-th image).

    Raises ValueError when the prompt's placeholders and the images do not pair up."""
    found = sum(1 for t in ids if t == placeholder)
    if found != len(counts):
        raise ValueError(f"the prompt has {found} image placeholders for {len(counts)} images")
    out: list[int] = []
    images = iter(counts)
    for t in ids:
        out += [t] * next(images) if t == placeholder else [t]
    return out

"""Images of chat requests: fetched or decoded, and checked, at the ingress before any work.

An `image_url` part carries a `data:` URL (base64 PNG, JPEG or WebP). Remote http(s) URLs are
refused unless the server allows fetching them, and then only within a size cap and a
timeout. Every failure is an `APIError` 400 that names the part and the problem: too many
bytes, too many pixels (checked from the header, before the pixels are decoded), a format we do
not take, or data that does not decode. What passes is an RGB `PIL.Image`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import httpx
from expertmesh.ernie.image import ImageInputs, ImageSettings, expand_placeholders, preprocess
from PIL import Image, UnidentifiedImageError

from . import openai_protocol as op

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 2**20  # encoded size of one image
    max_pixels: int = 4096 * 4096  # width x height of one image
    allow_remote: bool = False  # fetch http(s) URLs
    fetch_timeout_s: float = 10.0


def _bad(param: str, message: str) -> op.APIError:
    return op.bad_request(message, param=param, code="invalid_image")


def _data_url_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    """The bytes of a `data:[<mime>];base64,<data>` URL."""
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise _bad(param, "an image data URL must be data:image/<type>;base64,<data>")
    mime = head[5:-7].lower()
    if mime and mime not in FORMATS.values():
        raise _bad(param, f"unsupported image type {mime!r}; send PNG, JPEG or WebP")
    if len(data) * 3 // 4 > limits.max_bytes + 3:
        raise _bad(param, f"the image is over {limits.max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(param, "the image data URL is not valid base64") from None


async def _fetch(url: str, limits: ImageLimits, param: str) -> bytes:
    """GET a remote image, at most `max_bytes` and `fetch_timeout_s`."""
    chunks, size = [], 0
    try:
        async with httpx.AsyncClient(timeout=limits.fetch_timeout_s) as client:
            async with client.stream("GET", url, follow_redirects=True) as r:
                if r.status_code != 200:
                    raise _bad(param, f"fetching the image gave HTTP {r.status_code}")
                async for chunk in r.aiter_bytes():
                    size += len(chunk)
                    if size > limits.max_bytes:
                        raise _bad(param, f"the image is over {limits.max_bytes} bytes")
                    chunks.append(chunk)
    except httpx.HTTPError as e:
        raise _bad(param, f"could not fetch the image: {type(e).__name__}") from None
    return b"".join(chunks)


def decode_image(raw: bytes, limits: ImageLimits, param: str) -> Image.Image:
    """Check format and size from the header, then decode to RGB."""
    if len(raw) > limits.max_bytes:
        raise _bad(param, f"the image is over {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))  # reads the header only
            if img.format not in FORMATS:
                raise _bad(param, f"unsupported image format {img.format}; send PNG, JPEG or WebP")
            w, h = img.size
            if w * h > limits.max_pixels:
                raise _bad(
                    param, f"the image is {w}x{h} pixels; at most {limits.max_pixels} are taken"
                )
            img.load()
    except op.APIError:
        raise
    except UnidentifiedImageError:  # PIL's message names an in-memory object, not the data
        raise _bad(param, "the image could not be decoded: not a known image format") from None
    except (OSError, SyntaxError, ValueError, Warning) as e:
        raise _bad(param, f"the image could not be decoded: {e}") from None
    if min(img.size) < 1:
        raise _bad(param, "the image is empty")
    return img.convert("RGB")


async def load_image(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """The image an `image_url` part points to, decoded off the event loop."""
    if url.startswith("data:"):
        raw = _data_url_bytes(url, limits, param)
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise _bad(
                param,
                "this server does not fetch remote images; send the image inline as a "
                "data:image/...;base64 URL",
            )
        raw = await _fetch(url, limits, param)
    else:
        raise _bad(param, "an image URL must be a data: URL (or http(s), where allowed)")
    return await asyncio.to_thread(decode_image, raw, limits, param)


class RequestImages:
    """A VL model's side of a chat request: its images, checked and preprocessed, and the
    prompt as the engine will see it (each placeholder expanded to its image's tokens)."""

    def __init__(self, args, model_path: str, model_cfg):
        self.max_images = args.max_images_per_request
        self.limits = ImageLimits(
            max_bytes=args.max_image_bytes,
            max_pixels=args.max_image_pixels,
            allow_remote=args.allow_remote_images,
            fetch_timeout_s=args.image_fetch_timeout_s,
        )
        self.settings = ImageSettings.from_dir(model_path)
        self.placeholder = model_cfg.vision.image_token_id if model_cfg.is_vl else None

    async def load(self, req) -> ImageInputs | None:
        """The request's images, fetched or decoded, checked and preprocessed; None if none."""
        parts = op.image_parts(req)
        if not parts:
            return None
        if len(parts) > self.max_images:
            raise op.bad_request(
                f"the request has {len(parts)} images; this server takes at most {self.max_images}",
                param="messages",
            )
        loaded = await asyncio.gather(*(load_image(url, self.limits, p) for p, url in parts))
        try:
            return await asyncio.to_thread(preprocess, loaded, self.settings)
        except ValueError as e:  # e.g. an aspect ratio the processor cannot resize
            raise op.bad_request(f"an image cannot be processed: {e}", "messages") from None

    def expanded(self, prompt: list[int], images: ImageInputs | None) -> list[int]:
        """The prompt with each image placeholder expanded to that image's tokens."""
        if images is None:
            return prompt
        counts = images.tokens_per_image(self.settings.merge_size)
        found = prompt.count(self.placeholder)
        if found != len(counts):
            raise op.bad_request(
                f"the chat template wrote {found} image placeholders for {len(counts)} images",
                param="messages",
            )
        return expand_placeholders(prompt, self.placeholder, counts)

"""transformers' ERNIE-4.5-VL as the reference, fed the way its processor feeds it.

`Ernie4_5_VLMoeProcessor` itself cannot be built here (its video processor needs torchvision),
so its steps are taken with its own pieces: the chat template's text, each image placeholder
string replaced by `replace_image_token`, the tokenizer, `create_moe_mm_token_type_ids`, and
pixels from `Ernie4_5_VLMoeImageProcessorPil` configured by the checkpoint's
preprocessor_config.json. The engine's side gets one placeholder per image and PIL images.
"""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import numpy as np
import torch
from expertmesh.ernie.tokenizer import chat_prompt_ids, load_tokenizer

TOL = 1e-4
IMAGE = "<|IMAGE_PLACEHOLDER|>"


def image(h: int, w: int, seed: int = 0, mode: str = "RGB"):
    from PIL import Image

    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def _user(*parts) -> dict:
    return {"role": "user", "content": [{"type": "image"} if p is None else p for p in parts]}


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


# name -> (messages, images); None in a user turn is an image part
CASES = {
    "text": ([{"role": "user", "content": "Hello there, what is the capital of France?"}], []),
    "one-image": ([_user(None, _text("What is in this picture?"))], [image(50, 90, 1)]),
    "two-images": (
        [_user(_text("Compare"), None, _text(" and "), None)],
        [image(50, 90, 2), image(130, 60, 3)],  # grids 4x6 and 10x4: 6 and 10 tokens
    ),
    "second-turn": (
        [
            {"role": "user", "content": "Hi, can you see images?"},
            {"role": "assistant", "content": "Yes, show me one."},
            _user(_text("Here:"), None, _text(" what is it?")),
        ],
        [image(70, 70, 4)],
    ),
}


@functools.cache
def tokenizer(path):
    return load_tokenizer(path)


@functools.cache
def reference(path):
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    return Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32
    ).eval()


@functools.cache
def image_processor(path):
    from transformers import Ernie4_5_VLMoeImageProcessorPil

    raw = json.loads((path / "preprocessor_config.json").read_text())
    raw.pop("image_processor_type", None)
    return Ernie4_5_VLMoeImageProcessorPil(**raw)


def prompt(path, name: str) -> tuple[list[int], list]:
    """The engine's input for a case: chat ids with one placeholder per image, and images."""
    messages, images = CASES[name]
    return chat_prompt_ids(tokenizer(path), messages), images


def _processor(path):
    """What transformers' processor methods read of `self`."""
    tok = tokenizer(path)
    ids = {
        f"{m}_{p}token_id": tok.convert_tokens_to_ids(f"<|{m.upper()}_{s}|>")
        for m in ("image", "video")
        for p, s in (("", "PLACEHOLDER"), ("start_", "START"), ("end_", "END"))
    }
    return SimpleNamespace(image_token=IMAGE, image_processor=SimpleNamespace(merge_size=2), **ids)


def ref_inputs(path, name: str) -> dict[str, torch.Tensor]:
    """The reference model's inputs for a case, as the processor makes them (batch of 1)."""
    from transformers.models.ernie4_5_vl_moe.processing_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeProcessor as P,
    )

    messages, images = CASES[name]
    tok, proc = tokenizer(path), _processor(path)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out: dict[str, torch.Tensor] = {}
    if images:
        pix = image_processor(path)(images=images, return_tensors="pt")
        out = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}
        pieces = text.split(IMAGE)
        text = pieces[0] + "".join(
            P.replace_image_token(proc, out, i) + piece for i, piece in enumerate(pieces[1:])
        )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out["input_ids"] = torch.tensor([ids])
    if images:
        out["mm_token_type_ids"] = (out["input_ids"] == proc.image_token_id).long()
        out["moe_mm_token_type_ids"] = torch.tensor([P.create_moe_mm_token_type_ids(proc, ids)])
    return out


def ref_logits(path, name: str) -> torch.Tensor:
    with torch.no_grad():
        return reference(path)(**ref_inputs(path, name)).logits[0].float()  # [L, V]


@functools.cache
def ref_greedy(path, name: str, n: int) -> list[int]:
    inputs = ref_inputs(path, name)
    with torch.no_grad():
        out = reference(path).generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float((got - want).abs().max())

"""A tiny random ERNIE-4.5-VL checkpoint, written by transformers itself.

`Ernie4_5_VLMoeForConditionalGeneration(config).save_pretrained` writes the Hub layout of
`baidu/ERNIE-4.5-VL-28B-A3B-PT`: per MoE layer one list of 2E experts (text, then vision, each
its own width), routers `mlp.gate.weight` / `mlp.gate.weight_1` stored [H, E], the correction
bias [2, E], `model.vision_model.*`, `model.resampler_model.*`. So a reader that loads this
directory reads what users download, and transformers is the reference on the same files.

Weights are drawn from one seeded generator (not transformers' init, whose std 0.02 makes every
logit and routing decision nearly uniform): linear weights ~ N(0, (gain / sqrt(fan_in))^2),
norms 1 + noise, small biases, nonzero correction biases. Tokenizer: the tiny BPE of
`tiny.py` plus ERNIE-VL's image and video special tokens, and a chat template that writes
`Picture N:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>` for each image part.
`preprocessor_config.json` keeps images small (at most `max_image_tokens` tokens each).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from .image import CLIP_MEAN, CLIP_STD
from .tiny import MAX_POSITIONS, SEP, SPECIAL_TOKENS, _tokenizer_config, tokenizer_json

# (name in tokenizer_config's extra_special_tokens, text), in id order after the BPE vocab
VL_TOKENS = (
    ("image_token", "<|IMAGE_PLACEHOLDER|>"),
    ("image_start_token", "<|IMAGE_START|>"),
    ("image_end_token", "<|IMAGE_END|>"),
    ("video_token", "<|VIDEO_PLACEHOLDER|>"),
    ("video_start_token", "<|VIDEO_START|>"),
    ("video_end_token", "<|VIDEO_END|>"),
)
LINEAR_GAIN, GATE_GAIN, EMBED_STD = 2.0, 2.0, 0.5
CORRECTION_STD, NORM_NOISE, BIAS_STD = 0.05, 0.1, 0.02

# ERNIE-4.5-VL's turn format; an image part becomes "Picture N:" and its three tokens.
VL_CHAT_TEMPLATE = (
    "{%- set images = namespace(n=0) -%}"
    "{{- '<|begin_of_sentence|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}{{- 'User: ' -}}"
    "{%- elif message.role == 'assistant' -%}{{- 'Assistant: ' -}}{%- endif -%}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if part.type == 'text' -%}{{- part.text -}}"
    "{%- elif part.type in ['image', 'image_url'] -%}{%- set images.n = images.n + 1 -%}"
    "{{- 'Picture ' ~ images.n ~ ':<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if message.role == 'assistant' -%}{{- '<|end_of_sentence|>' -}}"
    "{%- else -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt is not defined or add_generation_prompt -%}"
    "{{- 'Assistant: ' -}}{%- endif -%}"
)


def vl_tokenizer_json() -> tuple[str, dict[str, int]]:
    """tokenizer.json text of the tiny BPE plus the VL specials, and their ids by name."""
    tok = Tokenizer.from_str(tokenizer_json())
    tok.add_special_tokens([AddedToken(text, special=True) for _, text in VL_TOKENS])
    return tok.to_str(), {name: tok.token_to_id(text) for name, text in VL_TOKENS}


def _write_tokenizer(out: Path) -> dict[str, int]:
    text, ids = vl_tokenizer_json()
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    config = _tokenizer_config() | {
        "extra_special_tokens": dict(VL_TOKENS),
        "chat_template": VL_CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", config)
    return ids


def _preprocessor_config(max_image_tokens: int) -> dict:
    # the class the Hub names (torchvision-based); its settings are what matter here
    return {
        "image_processor_type": "Ernie4_5_VLMoeImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * max_image_tokens},
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 1,
    }


def _config(a: dict, vocab: int, ids: dict[str, int]):
    from transformers import Ernie4_5_VLMoeConfig

    head_dim = a["hidden"] // a["heads"]
    t_pairs = 2 * max(1, head_dim // 16)  # head_dim 16: mrope_section [3, 3, 2]
    hw_pairs = (head_dim // 2 - t_pairs) // 2
    text = dict(
        hidden_size=a["hidden"], intermediate_size=4 * a["hidden"],
        num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
        num_key_value_heads=a["kv_heads"], head_dim=head_dim, vocab_size=vocab,
        moe_num_experts=a["experts"], moe_k=a["top_k"], moe_num_shared_experts=a["shared"],
        moe_intermediate_size=list(a["expert_widths"] or (2 * a["hidden"], a["hidden"])),
        use_bias=a["use_bias"],
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=a["tie_word_embeddings"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters=dict(
            rope_type="default", rope_theta=500000.0,
            mrope_section=[hw_pairs, hw_pairs, t_pairs],
        ),
    )  # fmt: skip
    vision = dict(
        depth=a["vision_depth"], hidden_size=a["vision_hidden"], num_heads=a["vision_heads"],
        intermediate_size=2 * a["vision_hidden"],
        rope_parameters=dict(rope_type="axial", rope_theta=10000.0),
    )  # fmt: skip
    return Ernie4_5_VLMoeConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=a["tie_word_embeddings"],
        **{f"{name}_id": i for name, i in ids.items()},
    )


def _init_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter from one seeded generator, in named order; see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "e_score_correction_bias" in name:
                v = torch.where(z == 0, 1.0, z) * CORRECTION_STD
            elif name.endswith("gate.weight"):
                v = z * GATE_GAIN / math.sqrt(p.shape[-1])
            elif "embed_tokens" in name or name == "lm_head.weight":
                v = z * EMBED_STD
            elif p.dim() == 1 and name.endswith(".bias"):
                v = z * BIAS_STD
            elif p.dim() == 1:  # norm weights
                v = 1.0 + z * NORM_NOISE
            else:  # [.., out, in] linear weights and stacked experts
                v = z * LINEAR_GAIN / math.sqrt(p.shape[-1])
            p.copy_(v.to(p.dtype))


def make_tiny_vl(
    out_dir, *, seed=0, experts=4, top_k=2, shared=1, layers=3, hidden=64, heads=4,
    kv_heads=2, vision_depth=2, vision_hidden=32, vision_heads=2, use_bias=False,
    tie_word_embeddings=True, max_image_tokens=16, max_shard_size="200KB", expert_widths=None,
) -> Path:  # fmt: skip
    """Writes a tiny random ERNIE-4.5-VL checkpoint (Hub layout, via transformers) into
    out_dir, with tokenizer, chat template, generation and preprocessor configs; returns it.
    Layer 0 is dense, the others MoE with `experts` text and `experts` vision experts (the
    vision ones half as wide, unless `expert_widths` gives (text, vision) widths)."""
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    a = {k: v for k, v in locals().items() if k != "out_dir"}
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k={top_k} must be in [1, experts={experts}]")
    if hidden % heads or (hidden // heads) % 4 or vision_hidden % (4 * vision_heads):
        raise ValueError("hidden/heads must be a multiple of 4, vision_hidden of 4 * vision_heads")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(out)
    vocab = -(-(max(ids.values()) + 1) // 64) * 64
    with torch.random.fork_rng(devices=[]):  # transformers' own init draws from the global RNG
        model = Ernie4_5_VLMoeForConditionalGeneration(_config(a, vocab, ids)).eval()
    _init_(model, seed)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    eos = [2, SPECIAL_TOKENS.index(SEP)]  # the chat turn end stops generation too
    _write_json(
        out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": 0}
    )
    _write_json(out / "preprocessor_config.json", _preprocessor_config(max_image_tokens))
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

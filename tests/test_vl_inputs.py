"""ERNIE-4.5-VL inputs: the checkpoint layout and what a worker reads of it, image
preprocessing, placeholder expansion, modality of tokens and 3D positions, each against
transformers' own code on the same files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.image import ImageSettings, expand_placeholders, preprocess
from expertmesh.router.model import GatewayModel
from expertmesh.router.mrope import MRotary
from expertmesh.router.multimodal import multimodal_prompt
from expertmesh.workers.experts import ExpertShard
from expertmesh.workers.placement import ExpertPlacement
from vl_reference import CASES, image, image_processor, prompt, ref_inputs, reference


def test_checkpoint_is_in_the_hub_layout(vl_checkpoint):
    cfg = ModelConfig.from_dir(vl_checkpoint)
    e, h = cfg.num_text_experts, cfg.hidden_size
    assert cfg.is_vl and cfg.num_experts == 2 * e == 8 and cfg.num_vision_experts == e
    assert cfg.moe_layers == (1, 2) and cfg.mrope_section == (3, 3, 2)
    index = json.loads((vl_checkpoint / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    p = "model.layers.1.mlp"
    with CheckpointReader(vl_checkpoint) as r:
        assert r.read(f"{p}.gate.weight", (h, e)).dtype == torch.float32  # stored [H, E]
        r.read(f"{p}.gate.weight_1", (h, e))
        bias = r.read(f"{p}.moe_statics.e_score_correction_bias", (2, e))
        assert (bias != 0).all()
        for j in range(2 * e):
            width = cfg.moe_intermediate_size if j < e else cfg.vision_moe_intermediate_size
            r.read(f"{p}.experts.{j}.down_proj.weight", (h, width))
    assert cfg.vision_moe_intermediate_size != cfg.moe_intermediate_size
    assert f"{p}.experts.{2 * e}.up_proj.weight" not in keys
    assert any(k.startswith("model.vision_model.blocks.") for k in keys)
    assert any(k.startswith("model.resampler_model.spatial_linear.") for k in keys)


def test_a_worker_reads_only_its_experts(vl_checkpoint):
    cfg = ModelConfig.from_dir(vl_checkpoint)
    with CheckpointReader(vl_checkpoint) as reader:
        shard = ExpertShard.load(reader, cfg, [1, 6], torch.float32)  # one text, one vision
        assert {k.split(".experts.")[1].split(".")[0] for k in reader.tensors_read} == {"1", "6"}
        assert len(reader.tensors_read) == 3 * 2 * len(cfg.moe_layers)
    w13, w2 = shard.stacked(1, vision=True)
    assert w13.shape == (1, 2 * cfg.vision_moe_intermediate_size, cfg.hidden_size)
    with CheckpointReader(vl_checkpoint) as reader:
        GatewayModel.load(reader, cfg, torch.float32)
        assert not [k for k in reader.tensors_read if ".experts." in k]


def test_placement_gives_every_worker_both_modalities():
    assert ExpertPlacement.contiguous(8, 2, groups=2).owner == (0, 0, 1, 1, 0, 0, 1, 1)
    assert ExpertPlacement.contiguous(8, 3, groups=2).owner == (0, 0, 1, 2) * 2
    with pytest.raises(ValueError):
        ExpertPlacement.contiguous(8, 5, groups=2)


def test_preprocessing_matches_transformers(vl_checkpoint):
    images = [image(50, 90), image(400, 300, 1), image(20, 20, 2), image(33, 500, 3)]
    images += [image(70, 70, 4, "RGBA"), image(64, 40, 5, "L")]
    want = image_processor(vl_checkpoint)(images=images, return_tensors="pt")
    got = preprocess(images, ImageSettings.from_dir(vl_checkpoint))
    assert torch.equal(got.grid_thw, want["image_grid_thw"])
    assert torch.equal(got.pixel_values, want["pixel_values"])
    assert max(got.tokens_per_image(2)) <= 16  # the tiny checkpoint's max_pixels


def test_image_settings_come_from_the_checkpoint(vl_checkpoint):
    s = ImageSettings.from_dir(vl_checkpoint)
    assert (s.min_pixels, s.max_pixels, s.patch_size, s.merge_size) == (3136, 28 * 28 * 16, 14, 2)
    assert ImageSettings.from_dict({"min_pixels": 10, "max_pixels": 99}).max_pixels == 99


def test_expand_placeholders():
    assert expand_placeholders([5, 9, 6, 9, 7], 9, [2, 3]) == [5, 9, 9, 6, 9, 9, 9, 7]
    with pytest.raises(ValueError, match="2 image placeholders for 1 images"):
        expand_placeholders([9, 9], 9, [4])


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_layout_matches_the_processor_and_rope_index(vl_checkpoint, name):
    """Expanded ids, vision-routed tokens and 3D positions of the engine's prompt."""
    cfg = ModelConfig.from_dir(vl_checkpoint)
    ids, images = prompt(vl_checkpoint, name)
    want = ref_inputs(vl_checkpoint, name)
    images = preprocess(images, ImageSettings.from_dir(vl_checkpoint)) if images else None
    expanded, mm = multimodal_prompt(ids, cfg, images)
    assert expanded == want["input_ids"][0].tolist()
    if mm is None:
        assert name == "text"
        return
    assert torch.equal(mm.vision.long(), want["moe_mm_token_type_ids"][0])
    positions, delta = reference(vl_checkpoint).model.get_rope_index(
        want["input_ids"], want["mm_token_type_ids"], want["image_grid_thw"]
    )
    assert torch.equal(mm.positions, positions[:, 0]) and mm.delta == int(delta)


def test_3d_rotary_matches_transformers(vl_checkpoint):
    cfg = ModelConfig.from_dir(vl_checkpoint)
    ours = MRotary(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    theirs = reference(vl_checkpoint).model.language_model.rotary_emb
    pos = torch.randint(0, 300, (3, 1, 40))  # [3, B, T] (t, h, w)
    cos, sin = theirs(torch.zeros(1), pos)  # [B, T, D], each pair's value repeated
    got_cos, got_sin = ours(pos[:, 0])  # [T, 1, D/2]
    assert torch.allclose(got_cos[:, 0], cos[0, :, ::2], atol=1e-6)
    assert torch.allclose(got_sin[:, 0], sin[0, :, ::2], atol=1e-6)
    text = torch.arange(40)
    assert torch.allclose(ours(text)[0], ours(text.expand(3, -1))[0])


def test_the_hubs_original_flat_config_reads_the_same(vl_checkpoint):
    """`ernie4_5_moe_vl` (the Hub's own config.json) maps as transformers' converter maps it."""
    raw = json.loads((vl_checkpoint / "config.json").read_text())
    text, vis = raw["text_config"], raw["vision_config"]
    e, layers = text["moe_num_experts"], text["num_hidden_layers"]
    flat = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    flat |= {k: text[k] for k in ("num_attention_heads", "num_key_value_heads", "vocab_size")}
    flat |= {k: text[k] for k in ("moe_k", "moe_num_shared_experts", "moe_intermediate_size")}
    flat |= {k: text[k] for k in ("rms_norm_eps", "use_bias", "max_position_embeddings")}
    flat |= dict(
        model_type="ernie4_5_moe_vl", moe_num_experts=[e, e], moe_layer_start_index=[1, 1],
        moe_layer_end_index=[layers - 1, layers - 1], moe_layer_interval=1, rope_theta=500000.0,
        mrope_section=[3, 3, 2], im_patch_id=raw["image_token_id"], spatial_conv_size=2,
        temporal_conv_size=2, tie_word_embeddings=True, dtype="float32",
        vision_config=dict(
            depth=vis["depth"], embed_dim=vis["hidden_size"], num_heads=vis["num_heads"],
            mlp_ratio=vis["intermediate_size"] // vis["hidden_size"], hidden_act="quick_gelu",
            in_channels=3, patch_size=14, spatial_merge_size=2,
        ),
    )  # fmt: skip
    want = ModelConfig.from_dir(vl_checkpoint)
    got = ModelConfig.from_dict(flat, eos_override=want.eos_token_ids)
    ids = {k: getattr(want.vision, k) for k in ("image_start_token_id", "image_end_token_id")}
    ids |= {
        f"video_{p}token_id": getattr(want.vision, f"video_{p}token_id")
        for p in ("", "start_", "end_")
    }
    assert dataclasses.replace(got, vision=dataclasses.replace(got.vision, **ids)) == want

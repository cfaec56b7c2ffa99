"""Reading checkpoints: config parsing, lazy per-expert reads, and clear errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import CONFIGS
from expertmesh.ernie.checkpoint import CheckpointError, CheckpointReader
from expertmesh.ernie.config import ConfigError, ModelConfig
from expertmesh.router.engine import LLMEngine
from expertmesh.router.model import GatewayModel
from expertmesh.workers.experts import ExpertShard
from safetensors import safe_open
from safetensors.torch import load_file, save_file


@pytest.fixture
def ckpt(make_checkpoint, tmp_path):
    """A private copy that a test may break."""
    src = make_checkpoint(**CONFIGS["top2of8-shared1"])
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def shard_file_of(path, key):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path / index["weight_map"][key]


def rewrite(path, key, tensor):
    """Replace (or with tensor=None drop) one tensor in its shard file."""
    f = shard_file_of(path, key)
    tensors = load_file(f)
    if tensor is None:
        del tensors[key]
    else:
        tensors[key] = tensor
    save_file(tensors, f, metadata={"format": "pt"})


def test_config_fields(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top4of16-shared2-start2-every2"])
    cfg = ModelConfig.from_dir(path)
    assert (cfg.num_experts, cfg.top_k, cfg.num_shared_experts) == (16, 4, 2)
    assert cfg.moe_layers == (3,)  # 4 layers, start 2, every 2nd: (i+1) % 2 == 0 and i >= 2
    assert cfg.eos_token_ids[0] == 2


def test_transformers_style_config_is_read():
    raw = {
        "model_type": "ernie4_5_moe",
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "vocab_size": 64,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "moe_num_experts": 4,
        "moe_k": 2,
        "rope_parameters": {"rope_theta": 1234.0, "rope_type": "default"},
        "moe_layer_end_index": -1,
    }
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_theta == 1234.0 and cfg.head_dim == 8 and cfg.num_kv_heads == 4
    assert cfg.moe_layers == (1, 2)


def test_shard_reads_only_its_experts(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    cfg = ModelConfig.from_dir(path)
    with CheckpointReader(path) as reader:
        shard = ExpertShard.load(reader, cfg, [2, 5], torch.float32)
    assert len(reader.tensors_read) == 3 * 2 * len(cfg.moe_layers)
    assert all(".experts.2." in k or ".experts.5." in k for k in reader.tensors_read)
    assert reader.bytes_read == shard.nbytes


def test_gateway_reads_no_routed_expert(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    cfg = ModelConfig.from_dir(path)
    with CheckpointReader(path) as reader:
        GatewayModel.load(reader, cfg, torch.float32)
        assert reader.tensors_read
        assert not [k for k in reader.tensors_read if ".experts." in k]
        assert not [k for k in reader.keys() if "mtp" in k]  # model.mtp_* ignored


def test_mtp_tensors_are_skipped(ckpt):
    """The Hub's `model.mtp_*` tensors (what make_tiny writes) and a top-level `mtp*` one (as
    older checkpoints have it) are not model tensors: the reader lists neither."""
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    assert "model.mtp_linear_proj.0.weight" in index["weight_map"]
    assert "model.mtp_block.0.self_attn.q_proj.weight" in index["weight_map"]
    key = "model.layers.0.input_layernorm.weight"
    f = shard_file_of(ckpt, key)
    tensors = load_file(f)
    tensors["mtp_linear_proj.0.weight"] = torch.zeros(64, 128)
    save_file(tensors, f, metadata={"format": "pt"})
    index["weight_map"]["mtp_linear_proj.0.weight"] = f.name
    index_file.write_text(json.dumps(index))
    with CheckpointReader(ckpt) as reader:
        assert key in reader
        assert not [k for k in reader.keys() if "mtp" in k]
    engine = LLMEngine.from_checkpoint(ckpt)
    assert torch.isfinite(engine.score([[5, 6, 7]])[0]).all()


def test_single_file_checkpoint_skips_mtp(make_checkpoint):
    path = make_checkpoint(experts=4, top_k=2, shards=1, seed=9)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert "model.mtp_linear_proj.0.weight" in f.keys()
    with CheckpointReader(path) as reader:
        assert not [k for k in reader.keys() if "mtp" in k]


def test_single_file_checkpoint(make_checkpoint):
    path = make_checkpoint(experts=4, top_k=2, shards=1, seed=9)
    assert (path / "model.safetensors").is_file()
    assert not (path / "model.safetensors.index.json").exists()
    engine = LLMEngine.from_checkpoint(path, num_shards=2)
    assert torch.isfinite(engine.score([[5, 6, 7]])[0]).all()


def test_missing_tensor_names_key_and_shape(ckpt):
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    rewrite(ckpt, key, None)
    with pytest.raises(CheckpointError, match=rf"{key}.*\[128, 64\]"):
        LLMEngine.from_checkpoint(ckpt, num_shards=2)


def test_wrong_shape_names_key_and_both_shapes(ckpt):
    key = "model.layers.0.self_attn.q_proj.weight"
    rewrite(ckpt, key, torch.zeros(3, 64))
    with pytest.raises(CheckpointError, match=rf"{key}.*\[3, 64\].*expected \[64, 64\]"):
        LLMEngine.from_checkpoint(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        ModelConfig.from_dir(ckpt)


def test_missing_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["moe_k"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="moe_k"):
        ModelConfig.from_dir(ckpt)


def test_no_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_dir(ckpt)


def test_model_path_missing_or_a_file(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "nope")) + ".*does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("{}")
    with pytest.raises(
        ConfigError, match=re.escape(str(tmp_path / "file")) + ".*is not a directory"
    ):
        ModelConfig.from_dir(tmp_path / "file")

"""The tiny random ERNIE 4.5 MoE checkpoint: Hub layout, transformers loads it, tokenizer."""

from __future__ import annotations

import inspect
import json
import math
import unicodedata

import pytest
import torch
from expertmesh.ernie.tiny import (
    DEFAULT_TINY,
    SPECIAL_TOKENS,
    SUPPRESS_MARGIN,
    make_tiny,
    suppressed_ids,
    tokenizer_size,
)
from expertmesh.router.engine import LLMEngine
from expertmesh.router.sampling import SamplingParams
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, Ernie4_5_MoeForCausalLM

VARIANTS = {
    "defaults": {},
    "wide": dict(experts=16, top_k=4, shared=2, moe_start=2, moe_interval=2),
    "no-shared": dict(shared=0),
    "one-shard": dict(shards=1),
    "bias-untied": dict(use_bias=True, tie_word_embeddings=False),
}


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _load(path):
    return Ernie4_5_MoeForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_transformers_loads_it(tmp_path, kw):
    path = make_tiny(tmp_path / "m", **kw)
    model, info = _load(path)
    assert not info["missing_keys"]
    assert all(k.startswith("model.mtp_") for k in info["unexpected_keys"])
    assert not info.get("mismatched_keys")
    cfg = json.loads((path / "config.json").read_text())
    ids = torch.arange(3, 40).unsqueeze(0)  # [1, T]
    with torch.no_grad():
        logits = model(ids).logits  # [1, T, V]
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"])
    assert torch.isfinite(logits).all()
    _check_moe_layers(model, path, cfg)


def _check_moe_layers(model, path, cfg):
    """MoE layers sit where the rule says; their correction bias is loaded (and nonzero)."""
    files = _tensors(path)
    end = cfg["moe_layer_end_index"]
    for i, layer in enumerate(model.model.layers):
        moe = (i + 1) % cfg["moe_layer_interval"] == 0 and cfg["moe_layer_start_index"] <= i <= end
        key = f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias"
        assert (key in files) == moe
        if not moe:
            continue
        loaded = layer.mlp.gate.moe_statics.e_score_correction_bias
        assert torch.equal(loaded, files[key]) and (files[key] != 0).all()
        assert files[f"model.layers.{i}.mlp.gate.weight"].dtype == torch.float32
        assert torch.equal(layer.mlp.gate.weight, files[f"model.layers.{i}.mlp.gate.weight"])
        assert (layer.mlp.shared_experts is not None) == (cfg["moe_num_shared_experts"] > 0)
        _check_experts(layer.mlp.experts, files, f"model.layers.{i}.mlp.experts")


def _check_experts(experts, files, prefix):
    """transformers fuses the per-expert Hub tensors; they must land on the right expert."""
    for j in range(experts.gate_up_proj.shape[0]):
        gate, up = files[f"{prefix}.{j}.gate_proj.weight"], files[f"{prefix}.{j}.up_proj.weight"]
        assert torch.equal(experts.gate_up_proj[j], torch.cat([gate, up]))  # [2*inter, H]
        assert torch.equal(experts.down_proj[j], files[f"{prefix}.{j}.down_proj.weight"])


def test_hub_layout(tmp_path):
    path = make_tiny(tmp_path / "m", dtype="bfloat16", shards=3)
    names = sorted(p.name for p in path.glob("*.safetensors"))
    assert names == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = _tensors(path)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(
        names
    )
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    with safe_open(path / names[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert tensors["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (64, 128)
    assert tensors["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (128, 64)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (256, 64)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert "lm_head.weight" not in tensors and "model.mtp_linear_proj.0.weight" in tensors
    norm = tensors["model.layers.0.input_layernorm.weight"].float()
    assert not torch.allclose(norm, torch.ones_like(norm))
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["vocab_size"] % 64 == 0
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, SPECIAL_TOKENS.index("<|end_of_sentence|>")]


def test_single_shard_has_no_index(tmp_path):
    path = make_tiny(tmp_path / "m", shards=1)
    assert (path / "model.safetensors").is_file()
    assert not (path / "model.safetensors.index.json").exists()


def test_seed_determines_tensors(tmp_path):
    a = _tensors(make_tiny(tmp_path / "a", seed=3))
    b = _tensors(make_tiny(tmp_path / "b", seed=3))
    c = _tensors(make_tiny(tmp_path / "c", seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    bias = "model.layers.1.mlp.moe_statics.e_score_correction_bias"
    assert not torch.equal(a[bias], c[bias])


def test_vocab_argument(tmp_path):
    path = make_tiny(tmp_path / "m", vocab=1000)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 1000
    with pytest.raises(ValueError):
        make_tiny(tmp_path / "n", vocab=8)
    assert not (tmp_path / "n").exists()


def test_defaults_match_signature():
    params = inspect.signature(make_tiny).parameters
    assert {k: p.default for k, p in params.items() if k != "out_dir"} == DEFAULT_TINY


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny(tmp_path_factory.mktemp("tok")))


def test_tokenizer_round_trip(tokenizer):
    text = "Hello, wörld! 你好 🙂 123\n  tabs\t"
    ids = tokenizer.encode(text)
    assert ids[0] != tokenizer.bos_token_id  # no BOS added
    assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer):
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.encode(tok) == [i]
        assert tokenizer.convert_tokens_to_ids(tok) == i
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<unk>"
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Again"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_sentence|>S\nUser: Hi\nAssistant: Yo<|end_of_sentence|>User: Again\nAssistant: "
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == text[: -len("Assistant: ")]
    messages[-1]["content"] = [{"type": "text", "text": "Ag"}, {"type": "text", "text": "ain"}]
    parts = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert parts == text


def test_model_is_healthy(tmp_path):
    """bfloat16, 64 tokens: finite logits, and greedy decoding does not loop on one token."""
    path = make_tiny(tmp_path / "m")
    model = Ernie4_5_MoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = torch.tensor([[3, 100, 200, 300]])  # [1, 4]
    out = model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False)
    with torch.no_grad():
        logits = model(out).logits  # [1, 64, V]
    assert torch.isfinite(logits).all()
    assert len(set(out[0, 4:].tolist())) > 16


# The Hub's multi-token-prediction keys (baidu/ERNIE-4.5-21B-A3B-PT's index), all under model.
MTP_KEYS = {
    "model.mtp_block.0.input_layernorm.weight",
    "model.mtp_block.0.post_attention_layernorm.weight",
    *(f"model.mtp_block.0.self_attn.{x}_proj.weight" for x in "qkvo"),
    *(f"model.mtp_block.0.mlp.{x}_proj.weight" for x in ("gate", "up", "down")),
    "model.mtp_emb_norm.0.weight",
    "model.mtp_hidden_norm.0.weight",
    "model.mtp_linear_proj.0.weight",
}


def test_mtp_keys_have_hub_names(tmp_path):
    tensors = _tensors(make_tiny(tmp_path / "m"))
    assert {k for k in tensors if "mtp" in k} == MTP_KEYS  # none at the top level
    assert tensors["model.mtp_linear_proj.0.weight"].shape == (64, 128)
    assert tensors["model.mtp_block.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert tensors["model.mtp_emb_norm.0.weight"].shape == (64,)


def _readable(text: str) -> bool:
    """No U+FFFD, nothing non-printable but newline and tab (control, format, unassigned)."""
    return "\ufffd" not in text and all(
        c in "\n\t" or (c.isprintable() and not unicodedata.category(c).startswith("C"))
        for c in text
    )


def _unreadable_alone(tokenizer, ids) -> list[tuple[int, str]]:
    alone = [(i, tokenizer.decode([i])) for i in ids]
    return [(i, t) for i, t in alone if not t or not _readable(t)]


def test_builtin_model_emits_only_readable_tokens(tmp_path, monkeypatch):
    """Greedy and temperature-1 sampling, 256 tokens each, from a prompt full of partial-UTF-8
    byte tokens: every token decodes alone, and all of them together, to readable text."""
    from expertmesh.cluster.config import builtin_model_dir

    monkeypatch.setenv("EXPERTMESH_HOME", str(tmp_path))
    path = builtin_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.encode("User: ¿Qué tal? 你好 🙂🚀 naïve\x01\nAssistant: ")
    assert _unreadable_alone(tokenizer, prompt)  # the input may hold them
    engine = LLMEngine.from_checkpoint(path)
    try:
        runs = engine.generate(
            [prompt] * 3,
            [
                SamplingParams(max_tokens=256, temperature=0, ignore_eos=True),
                SamplingParams(max_tokens=256, temperature=1.0, seed=0, ignore_eos=True),
                SamplingParams(max_tokens=256, temperature=1.0, seed=1, ignore_eos=True),
            ],
        )
    finally:
        engine.close()
    for out in runs:
        assert len(out.token_ids) == 256
        assert not _unreadable_alone(tokenizer, out.token_ids)
        assert _readable(tokenizer.decode(out.token_ids))
        assert _readable(tokenizer.decode(out.token_ids, skip_special_tokens=True))
    assert len(set(runs[1].token_ids)) > 32  # sampling still spreads over the vocabulary


def test_suppressed_tokens_are_the_unreadable_ones(tmp_path, tokenizer):
    path = make_tiny(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    vocab, n_tok = cfg["vocab_size"], tokenizer_size()
    unreadable = {i for i, _ in _unreadable_alone(tokenizer, range(n_tok))}
    assert len(unreadable) > 128  # every byte >= 0x80 alone, control bytes, cut characters
    never = {tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "<|begin_of_sentence|>")}
    assert set(suppressed_ids(vocab)) == unreadable | never | set(range(n_tok, vocab))
    assert tokenizer.eos_token_id not in suppressed_ids(vocab)
    assert not _unreadable_alone(tokenizer, set(range(n_tok)) - set(suppressed_ids(vocab)))


def _worst_gap(path) -> float:
    """The smallest margin between a suppressed logit and a kept one, over adversarial final
    hidden states: for each pair, the normalised state u (||u|| = sqrt(H), the RMSNorm bound)
    that pushes the suppressed token up against the kept one as far as it can go."""
    t = _tensors(path)
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"]).float()  # [V, H]
    vocab, h = head.shape
    norm = t["model.norm.weight"].float()  # [H]
    bias = t.get("lm_head.bias", torch.zeros(vocab)).float()  # [V]
    bad = torch.tensor(suppressed_ids(vocab))
    good = torch.tensor(sorted(set(range(vocab)) - set(bad.tolist())))
    diff = (head[bad][:, None] - head[good][None]) * norm  # [B, G, H]
    # max over ||u|| <= sqrt(H) of diff . u is ||diff|| * sqrt(H)
    worst = diff.norm(dim=-1) * math.sqrt(h) + bias[bad][:, None] - bias[good][None]
    return float(-worst.max())


GAP_VARIANTS = {**VARIANTS, "bf16": dict(dtype="bfloat16"), "wide-hidden": dict(hidden=256)}


@pytest.mark.parametrize("kw", GAP_VARIANTS.values(), ids=GAP_VARIANTS.keys())
def test_suppression_holds_for_any_hidden_state(tmp_path, kw):
    path = make_tiny(tmp_path / "m", **kw)
    assert _worst_gap(path) > SUPPRESS_MARGIN
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["use_bias"]  # the lm_head bias


def test_readable_only_off_and_the_zero_biases(tmp_path):
    """readable_only adds biases without changing a weight: zeros, but for the lm_head's."""
    on = _tensors(make_tiny(tmp_path / "on"))
    off_path = make_tiny(tmp_path / "off", readable_only=False)
    off = _tensors(off_path)
    assert not json.loads((off_path / "config.json").read_text())["use_bias"]
    assert not [k for k in off if k.endswith(".bias")]
    assert {k for k in on if not k.endswith(".bias")} == set(off)
    assert all(torch.equal(on[k], off[k]) for k in off)
    biases = {k: v for k, v in on.items() if k.endswith(".bias")}
    assert "model.layers.0.self_attn.o_proj.bias" in biases
    assert "model.layers.1.mlp.shared_experts.down_proj.bias" in biases
    assert all(not v.any() for k, v in biases.items() if k != "lm_head.bias")
    assert _worst_gap(off_path) < 0  # without it, nothing keeps them out

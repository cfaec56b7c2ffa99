"""The engine against transformers' Ernie4_5_MoeForCausalLM on the same checkpoint (fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, hf_text_model, prompts_of, reference_model
from expertmesh.ernie import packed_linear
from expertmesh.ernie.config import ModelConfig
from expertmesh.router.engine import EngineConfig, LLMEngine
from expertmesh.router.sampling import SamplingParams
from expertmesh.workers import fused_moe
from expertmesh.workers.placement import ExpertPlacement

TOL = 1e-4


def ref_logits(path, prompt):
    with torch.no_grad():
        return reference_model(path)(torch.tensor([prompt])).logits[0].float()  # [L, V]


def ref_greedy(path, prompt, n):
    with torch.no_grad():
        out = reference_model(path).generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_logits_match_reference(make_checkpoint, name, shards):
    path = make_checkpoint(**CONFIGS[name])
    vocab = ModelConfig.from_dir(path).vocab_size
    engine = LLMEngine.from_checkpoint(path, num_shards=shards)
    prompts = prompts_of([1, 7, 64], vocab, seed=shards)
    ragged = engine.score(prompts)  # all three in one batch
    for prompt, got in zip(prompts, ragged):
        want = ref_logits(path, prompt)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= TOL
        alone = engine.score([prompt])[0]
        assert (alone - want).abs().max() <= TOL


@pytest.mark.parametrize("path_", ["fused", "packed", "dense"])
@pytest.mark.parametrize("shards", [1, 2])
def test_every_cpu_expert_path_matches_reference(make_checkpoint, monkeypatch, path_, shards):
    """The native fused-MoE kernel (float32 on one thread), oneDNN with packed weights (the
    default on AMD CPUs otherwise) and F.linear (elsewhere)."""
    packed = path_ != "dense"
    if packed and not packed_linear._supported(torch.float32):
        pytest.skip("no oneDNN float32 kernel on this torch")
    monkeypatch.setattr(packed_linear, "ENABLED", packed)
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "1" if path_ == "fused" else "0")
    path = make_checkpoint(**CONFIGS["top4of16-shared2-start2-every2"])
    engine = LLMEngine.from_checkpoint(path, num_shards=shards)
    w13 = engine.dispatcher.shards[0].weights[engine.model_cfg.moe_layers[0]][0]
    assert w13[0].is_mkldnn == (path_ == "packed")
    assert fused_moe.is_blocked(w13[0]) == (path_ == "fused")
    prompts = prompts_of([1, 9, 40], ModelConfig.from_dir(path).vocab_size, seed=5)
    for prompt, got in zip(prompts, engine.score(prompts)):
        assert (got - ref_logits(path, prompt)).abs().max() <= TOL


def test_any_expert_map_works(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    placement = ExpertPlacement.from_map([2, 0, 1, 2, 0, 1, 1, 2], num_experts=8)
    engine = LLMEngine.from_checkpoint(path, placement=placement)
    prompt = prompts_of([20], 200)[0]
    assert (engine.score([prompt])[0] - ref_logits(path, prompt)).abs().max() <= TOL


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("shards", [1, 3])
def test_greedy_matches_transformers_generate(make_checkpoint, name, shards):
    path = make_checkpoint(**CONFIGS[name])
    vocab = ModelConfig.from_dir(path).vocab_size
    prompts = prompts_of([3, 11, 30, 1], vocab, seed=7)
    engine = LLMEngine.from_checkpoint(path, num_shards=shards)
    outs = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == ref_greedy(path, prompt, 32)


def test_kv_cache_decode_equals_recomputing_the_prefix(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top4of16-shared2-start2-every2"])
    engine = LLMEngine.from_checkpoint(path, num_shards=2)
    prompts = prompts_of([2, 9, 17], 200, seed=3)
    params = SamplingParams(max_tokens=20, temperature=0, logprobs=5, ignore_eos=True)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        full = prompt + out.token_ids
        logp = torch.log_softmax(engine.score([full[:-1]])[0], -1)  # [L, V]
        for i, (tok, lp, top) in enumerate(zip(out.token_ids, out.logprobs, out.top_logprobs)):
            row = logp[len(prompt) - 1 + i]
            assert int(row.argmax()) == tok
            assert abs(float(row[tok]) - lp) <= TOL
            for t, v in top:
                assert abs(float(row[t]) - v) <= TOL


def test_chunked_prefill_matches(make_checkpoint):
    """A prompt split over several steps (small token budget) gives the same tokens."""
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    prompts = prompts_of([40, 5], 200, seed=5)
    params = SamplingParams(max_tokens=12, temperature=0)
    small = LLMEngine.from_checkpoint(path, EngineConfig(max_tokens_per_step=8, block_size=4))
    want = [ref_greedy(path, p, 12) for p in prompts]
    assert [o.token_ids for o in small.generate(prompts, params)] == want


def test_bfloat16_runs_close_to_fp32(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    prompt = prompts_of([16], 200)[0]
    bf16 = LLMEngine.from_checkpoint(path, EngineConfig(dtype="bfloat16"), num_shards=2)
    got = bf16.score([prompt])[0]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    want = ref_logits(path, prompt)
    # bf16 keeps ~3 significant digits; the argmax mostly agrees
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= 0.8


def test_checkpoint_written_by_transformers(tmp_path):
    """A checkpoint from transformers' save_pretrained (rope_parameters, its own sharding)."""
    model = hf_text_model(
        0,
        hidden_size=48,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=16,
        vocab_size=300,
        moe_num_experts=6,
        moe_k=3,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    engine = LLMEngine.from_checkpoint(tmp_path, num_shards=3)
    prompts = prompts_of([1, 9, 30], 300, seed=4)
    for prompt, got in zip(prompts, engine.score(prompts)):
        assert (got - ref_logits(tmp_path, prompt)).abs().max() <= TOL
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    assert [o.token_ids for o in outs] == [ref_greedy(tmp_path, p, 16) for p in prompts]


def test_requests_joining_mid_decode_match_their_solo_runs(make_checkpoint, monkeypatch):
    """Steps that mix decoding sequences with prompt chunks (attention in two groups) give
    every request the logprobs of transformers on its own prefix."""
    from expertmesh.router import engine as engine_module

    groups = []

    def counted(*args, **kwargs):
        ids, meta = build_step(*args, **kwargs)
        groups.append(len(meta.groups))
        return ids, meta

    build_step = engine_module.build_step
    monkeypatch.setattr(engine_module, "build_step", counted)
    path = make_checkpoint(**CONFIGS["top4of16-shared2-start2-every2"])
    engine = LLMEngine.from_checkpoint(path, EngineConfig(block_size=4), num_shards=2)
    prompts = prompts_of([3, 30, 1, 17], 200, seed=11)
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=1, ignore_eos=True)
    got = {}
    for i, prompt in enumerate(prompts):  # one joins every other step, beside running ones
        engine.add_request(f"r{i}", prompt, params)
        for _ in range(2):
            for ev in engine.step():
                got.setdefault(ev.request_id, []).append((ev.token_id, ev.logprob))
    while engine.has_work():
        for ev in engine.step():
            got.setdefault(ev.request_id, []).append((ev.token_id, ev.logprob))
    for i, prompt in enumerate(prompts):
        tokens = [t for t, _ in got[f"r{i}"]]
        assert tokens == ref_greedy(path, prompt, 10)
        logp = torch.log_softmax(ref_logits(path, prompt + tokens[:-1]), -1)  # [L, V]
        for j, (tok, lp) in enumerate(got[f"r{i}"]):
            assert abs(float(logp[len(prompt) - 1 + j, tok]) - lp) <= TOL
    assert 2 in groups and 1 in groups  # mixed steps were split, pure ones were not


def test_prompt_logprobs_match_reference_through_chunked_prefill(make_checkpoint):
    """`prompt_logprobs`: each prompt token's logprob under transformers' model (None for the
    first), gathered over prefill chunks of 7 tokens, sent once with the first token; next to
    a request that does not ask for them, and one whose prompt is a single token."""
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    engine = LLMEngine.from_checkpoint(
        path, EngineConfig(max_tokens_per_step=7, block_size=4), num_shards=2
    )
    prompts = prompts_of([18, 1, 9], engine.model_cfg.vocab_size, seed=5)
    ks = [2, 0, None]
    for i, (p, k) in enumerate(zip(prompts, ks)):
        engine.add_request(
            f"r{i}", p, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=k)
        )
    events = []
    while engine.has_work():
        events += engine.step()
    for i, (p, k) in enumerate(zip(prompts, ks)):
        sent = [e.prompt_logprobs for e in events if e.request_id == f"r{i}" and e.prompt_logprobs]
        if k is None:
            assert sent == []
            continue
        assert len(sent) == 1 and len(sent[0]) == len(p) and sent[0][0] is None
        want = torch.log_softmax(ref_logits(path, p), dim=-1)  # [L, V]
        for j, (lp, top) in enumerate(sent[0][1:]):
            assert abs(lp - float(want[j, p[j + 1]])) <= TOL
            assert [t for t, _ in top] == want[j].topk(k).indices.tolist() if k else top == []

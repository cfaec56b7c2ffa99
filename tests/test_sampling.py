"""Sampling: bounds of top-k and top-p, seeds, greedy, logprobs; and through the engine."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CONFIGS
from expertmesh.router.engine import LLMEngine
from expertmesh.router.sampling import SamplingParams, filter_logits, sample, step_seed

PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])  # token 1, then 3, then 2, then 0
LOGITS = PROBS.log()


def draws(params, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [sample(LOGITS[None], [params], [g])[0].token for _ in range(n)]


@pytest.mark.parametrize(
    "top_k,top_p,allowed",
    [
        (1, 1.0, {1}),
        (2, 1.0, {1, 3}),
        (3, 1.0, {1, 3, 2}),
        (0, 0.5, {1}),
        (0, 0.75, {1, 3}),
        (0, 0.9, {1, 3, 2}),
        (2, 0.9, {1, 3}),
    ],
)
def test_top_k_top_p_bounds(top_k, top_p, allowed):
    seen = set(draws(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)))
    assert seen == allowed  # never outside, and (with 400 draws) every allowed token appears


def test_filter_keeps_at_least_one():
    out = filter_logits(LOGITS, 0, 1e-6)
    assert torch.isfinite(out).sum() == 1 and int(out.argmax()) == 1


def test_sampling_follows_the_distribution():
    counts = torch.bincount(
        torch.tensor(draws(SamplingParams(temperature=1.0), n=4000)), minlength=4
    )
    assert torch.allclose(counts / 4000, PROBS, atol=0.03)


def test_seed_reproduces_and_differs():
    p = SamplingParams(temperature=1.0)
    assert draws(p, 50, seed=1) == draws(p, 50, seed=1)
    assert draws(p, 50, seed=1) != draws(p, 50, seed=2)


def test_greedy_and_logprobs():
    s = sample(
        LOGITS[None],
        [SamplingParams(temperature=0, logprobs=2)],
        [torch.Generator().manual_seed(0)],
    )[0]
    assert s.token == 1 and math.isclose(s.logprob, math.log(0.5), rel_tol=1e-5)
    assert [t for t, _ in s.top] == [1, 3]


@pytest.mark.parametrize(
    "bad",
    [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)],
)
def test_bad_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_seeded_sampling_through_the_engine_ignores_batchmates(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    engine = LLMEngine.from_checkpoint(path, num_shards=2)
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    alone = engine.generate([[5, 6, 7]], p)[0].token_ids
    other = SamplingParams(max_tokens=16, temperature=0.7, seed=1, ignore_eos=True)
    batched = engine.generate([[9, 9], [5, 6, 7], [11] * 9], [other, p, other])[1].token_ids
    assert alone == batched
    again = engine.generate([[5, 6, 7]], SamplingParams(**{**p.__dict__, "seed": 43}))[0]
    assert again.token_ids != alone


def test_step_seeds_differ_by_seed_and_step():
    seeds = {step_seed(s, k) for s in range(20) for k in range(50)}
    assert len(seeds) == 1000
    assert all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_resumed_request_continues_with_the_same_tokens(make_checkpoint, temperature):
    """Failover's promise at the engine: given the prompt, the tokens already sent and the
    seed, another engine continues with exactly the tokens the first would have made."""
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    engine = LLMEngine.from_checkpoint(path, num_shards=2)
    p = SamplingParams(max_tokens=12, temperature=temperature, top_k=20, seed=7, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    full = engine.generate([prompt], p)[0].token_ids
    assert len(full) == 12
    for k in (1, 5, 11):
        fresh = LLMEngine.from_checkpoint(path, num_shards=1)  # another gateway, other shards
        fresh.add_request("r", prompt, p, resume_ids=full[:k])
        out = []
        while fresh.has_work():
            out += [ev.token_id for ev in fresh.step()]
        assert full[:k] + out == full
    with pytest.raises(ValueError, match="nothing left"):
        engine.add_request("done", prompt, p, resume_ids=full)

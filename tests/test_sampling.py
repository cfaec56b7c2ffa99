"""Sampling: bounds of top-k, top-p and min-p, seeds, greedy, logprobs, the logit adjustments
(bias, min_tokens, penalties); and through the engine, against transformers' logits."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import CONFIGS, reference_model
from expertmesh.router.engine import LLMEngine
from expertmesh.router.sampling import (
    History,
    SamplingParams,
    adjust_logits,
    filter_logits,
    sample,
    step_seed,
)

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


@pytest.mark.parametrize(
    "min_p,top_p,allowed",
    [(1.0, 1.0, {1}), (0.5, 1.0, {1, 3}), (0.2, 1.0, {1, 3, 2}), (0.05, 1.0, {0, 1, 2, 3}),
     (0.2, 0.6, {1, 3})],
)  # fmt: skip
def test_min_p_keeps_the_tokens_near_the_likeliest(min_p, top_p, allowed):
    """min_p: p >= min_p * p_max stays (0.5 * 0.5 = 0.25: tokens 1 and 3); then top-p over the
    rest (0.2, 0.6: 0.5 / 0.95 < 0.6, so token 3 stays)."""
    seen = set(draws(SamplingParams(temperature=1.0, min_p=min_p, top_p=top_p)))
    assert seen == allowed


def test_adjustments_follow_their_definitions():
    """By hand: bias, then min_tokens bars the stop token, then repetition (prompt and output:
    a positive logit halves, a negative one doubles), presence and frequency (output only)."""
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 0.0])
    p = SamplingParams(
        max_tokens=8, min_tokens=4, repetition_penalty=2.0, presence_penalty=0.5,
        frequency_penalty=0.25, logit_bias=((1, 1.5), (5, 0.0)),
    )  # fmt: skip
    history = History(6, prompt=[0, 4], output=[3, 3, 2], stop_ids=frozenset({5, 99}))
    got = adjust_logits(logits, p, history)
    want = [2.0 / 2, -1.0 + 1.5, 0.5 / 2 - 0.25 - 0.5, 3.0 / 2 - 0.5 - 0.5, -2.0 * 2, -math.inf]
    assert got.tolist() == want
    assert logits[0] == 2.0  # the caller's logits are left alone
    history.add(1)  # a 4th output token: min_tokens reached
    later = adjust_logits(logits, p, history)
    assert later[5] == 0.0 and later[1] == (-1.0 + 1.5) / 2 - 0.25 - 0.5  # 1 is out once
    only_bias = SamplingParams(logit_bias=((2, -100.0), (2, 50.0)))  # repeats add up
    assert adjust_logits(logits, only_bias, None).tolist()[2] == 0.5 - 50


def test_adjusted_logits_decide_the_pick_but_not_the_logprob():
    g = [torch.Generator().manual_seed(0)]
    s = sample(LOGITS[None], [SamplingParams(temperature=0, logit_bias=((0, 100.0),))], g)[0]
    assert s.token == 0 and math.isclose(s.logprob, math.log(0.05), rel_tol=1e-5)
    p = SamplingParams(temperature=0, presence_penalty=2.0)
    s = sample(LOGITS[None], [p], g, [History(4, [1], [1])])[0]
    assert s.token == 3  # token 1's 0.5 less 2 falls below token 3's 0.3


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
    [
        dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
        dict(top_k=-2), dict(min_p=-0.1), dict(min_p=1.1), dict(min_tokens=5, max_tokens=4),
        dict(repetition_penalty=0), dict(repetition_penalty=math.inf), dict(presence_penalty=2.5), dict(frequency_penalty=-3),
        dict(logit_bias=((1, 101.0),)),
    ],
)  # fmt: skip
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
    again = engine.generate([[5, 6, 7]], dataclasses.replace(p, seed=43))[0]
    assert again.token_ids != alone


def test_step_seeds_differ_by_seed_and_step():
    seeds = {step_seed(s, k) for s in range(20) for k in range(50)}
    assert len(seeds) == 1000
    assert all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize("temperature, penalized", [(0.0, False), (1.0, False), (0.0, True)])
def test_a_resumed_request_continues_with_the_same_tokens(make_checkpoint, temperature, penalized):
    """Failover's promise at the engine: given the prompt, the tokens already sent and the
    seed, another engine continues with exactly the tokens the first would have made."""
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    engine = LLMEngine.from_checkpoint(path, num_shards=2)
    p = SamplingParams(max_tokens=12, temperature=temperature, top_k=20, seed=7, ignore_eos=True)
    if penalized:  # the resumed tokens count as output for the penalties too
        p = dataclasses.replace(p, repetition_penalty=1.4, frequency_penalty=0.6)
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


def reference_greedy(path, prompt, p: SamplingParams, eos: set[int]) -> list[int]:
    """Greedy tokens from transformers' logits (whole prefix each step) with the adjustments
    written out token by token from their definitions."""
    model, out = reference_model(path), []
    for _ in range(p.max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1].double()  # [V]
        for t, b in p.logit_bias:
            logits[t] += b
        if len(out) < p.min_tokens:
            logits[list(eos | set(p.stop_token_ids))] = -math.inf
        for t in set(prompt) | set(out):
            r = p.repetition_penalty
            logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r
        for t in set(out):
            logits[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
        out.append(int(logits.argmax()))
        if out[-1] in eos | set(p.stop_token_ids) and not (p.ignore_eos and out[-1] in eos):
            break
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(repetition_penalty=1.8),
        dict(presence_penalty=1.5, frequency_penalty=0.7),
        dict(repetition_penalty=0.6, frequency_penalty=-0.4),
        dict(min_tokens=6, logit_bias=((2, 60.0), (7, -100.0))),  # 2 is EOS: barred 6 tokens
    ],
)
def test_adjusted_greedy_through_the_engine_matches_the_reference(make_checkpoint, kw):
    """The engine hands the sampler the right prompt and output (with continuous batching,
    next to a plain request): its greedy tokens are those of transformers' logits adjusted by
    the definitions."""
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    engine = LLMEngine.from_checkpoint(path, num_shards=2)
    eos = set(engine.model_cfg.eos_token_ids)
    prompt = [5, 6, 7, 8, 5, 6]
    p = SamplingParams(max_tokens=12, temperature=0, **kw)
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = engine.generate([[9, 9, 9], prompt], [plain, p])[1].token_ids
    assert got == reference_greedy(path, prompt, p, eos)
    if "min_tokens" in kw:  # EOS, favoured by 60, comes right after them
        assert len(got) == 7 and got[-1] == 2 and 2 not in got[:-1]


def test_min_tokens_with_no_stop_token_to_bar(make_checkpoint):
    """With `ignore_eos` and no `stop_token_ids` min_tokens has nothing to bar (an empty set of
    ids, which once failed to index): the tokens are those without it."""
    history = History(8, [1, 2], stop_ids=frozenset())
    logits = torch.arange(8.0)
    p = SamplingParams(max_tokens=4, min_tokens=2, ignore_eos=True)
    assert torch.equal(adjust_logits(logits, p, history), logits)
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    engine = LLMEngine.from_checkpoint(path, num_shards=2)
    barred = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, min_tokens=3)
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    a, b = engine.generate([[5, 6, 7], [5, 6, 7]], [barred, plain])
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6

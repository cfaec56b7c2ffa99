"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds.

A seeded request's token at output position k depends only on (seed, k) and the logits, never on
the process that sampled the tokens before it: that is what lets a request move to another
gateway mid-stream and continue with the tokens it would have had.

Log-probabilities are those of the model's own distribution (log-softmax of the raw logits),
before temperature or filtering, as vLLM reports them by default.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with this much probability
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all
    seed: int | None = None  # per-request seed; the same seed gives the same tokens
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end generation
    ignore_eos: bool = False  # keep going past the model's EOS tokens
    logprobs: int | None = None  # also return this many most likely tokens per step
    return_routed_experts: bool = False  # report each token's experts in every MoE layer

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 or positive")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def base_seed(seed: int | None) -> int:
    """The request's seed, or a random one: every sampled request has one."""
    return seed if seed is not None else random.SystemRandom().randrange(2**63)


def step_seed(seed: int, step: int) -> int:
    """The seed of a request's draw at output position `step`.

    Draws depend on (seed, step) alone, not on how many draws came before in this process, so a
    request resumed at step k on another gateway (failover) draws exactly what it would have.
    """
    x = (seed + 0x9E3779B97F4A7C15 * (step + 1)) % 2**64  # splitmix64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] (already divided by temperature); tokens outside the bounds get -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already hold top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


@dataclass
class Sampled:
    token: int
    logprob: float
    top: list[tuple[int, float]] | None  # the most likely tokens and their logprobs


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> list[Sampled]:
    """logits: [B, V] fp32, one row per sequence that samples this step."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    tokens = torch.argmax(logits, dim=-1).tolist()  # [B] greedy picks
    out = []
    for b, (p, g) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            row = filter_logits(logits[b] / p.temperature, p.top_k, p.top_p)
            tokens[b] = int(torch.multinomial(row.softmax(-1), 1, generator=g))
        top = None
        if p.logprobs:
            vals, ids = torch.topk(logprobs[b], min(p.logprobs, logprobs.shape[-1]))
            top = list(zip(ids.tolist(), vals.tolist(), strict=True))
        out.append(Sampled(tokens[b], float(logprobs[b, tokens[b]]), top))
    return out

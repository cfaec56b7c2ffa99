"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, min-p, per-request
seeds; logit bias, min_tokens, and repetition / presence / frequency penalties.

A seeded request's token at output position k depends only on (seed, k) and the logits, never on
the process that sampled the tokens before it: that is what lets a request move to another
gateway mid-stream and continue with the tokens it would have had.

Log-probabilities are those of the model's own distribution (log-softmax of the raw logits),
before temperature or filtering, as vLLM reports them by default.

The logits a token is drawn from (or the greedy argmax taken of) are adjusted first, in vLLM's
order: a structured request's grammar masks the tokens it forbids; the logit bias is added;
while fewer than `min_tokens` tokens are out, the tokens that would end the request get -inf;
then the penalties. `repetition_penalty` (as in transformers and vLLM) divides a positive
logit, and multiplies a negative one, of every token seen in the prompt or the output;
`presence_penalty` is subtracted once from every token in the output so far,
`frequency_penalty` once per occurrence (OpenAI's definition). Then temperature, and the
filters: min-p (drop tokens less likely than min_p times the likeliest), top-k, top-p.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
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
    min_p: float = 0.0  # keep tokens at least this fraction as likely as the likeliest
    min_tokens: int = 0  # the stop tokens (EOS, stop_token_ids) are barred until this many
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output
    presence_penalty: float = 0.0  # subtracted from the logit of each token in the output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    structured: str | None = None  # the answer's grammar (`router.structured`): JSON
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs, with this many top ones

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
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError("prompt_logprobs must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError("repetition_penalty must be > 0 and finite")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if any(not -100 <= b <= 100 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if self.structured is not None and self.min_tokens:
            raise ValueError("min_tokens cannot hold off the end of a structured answer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether the draw depends on the tokens so far (a penalty, or min_tokens)."""
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.min_tokens > 0
        )

    @functools.cached_property
    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """logit_bias as ids [n] and biases [n], made once per request, not once per step."""
        ids, biases = zip(*self.logit_bias) if self.logit_bias else ((), ())
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(biases, dtype=torch.float32)

    @property
    def adjusts(self) -> bool:
        """Whether the logits are changed before the draw (`adjust_logits`)."""
        return self.penalized or bool(self.logit_bias)


class History:
    """What the adjustments of one request's draws look at, kept up to date token by token (a
    step costs the same whatever the prompt's length): which tokens its prompt holds, how often
    each token is in its output, and the tokens that would end it (barred by min_tokens)."""

    def __init__(
        self,
        vocab: int,
        prompt: Sequence[int],
        output: Sequence[int] = (),
        stop_ids: frozenset[int] = frozenset(),
    ):
        self.prompt_seen = torch.zeros(vocab, dtype=torch.bool)  # [V]
        self.prompt_seen[torch.as_tensor(list(prompt), dtype=torch.int64)] = True
        self.output_counts = torch.zeros(vocab)  # [V] float32
        self.num_output = 0
        stops = sorted(t for t in stop_ids if 0 <= t < vocab)
        self.stop_ids = torch.tensor(stops, dtype=torch.int64)  # [s], maybe empty (ignore_eos)
        for t in output:
            self.add(t)

    def add(self, token: int) -> None:
        """A token was appended to the output."""
        self.output_counts[token] += 1
        self.num_output += 1


def adjust_logits(logits: torch.Tensor, p: SamplingParams, history: History | None) -> torch.Tensor:
    """logits: [V] raw -> [V] with the logit bias, min_tokens and the penalties applied (a new
    tensor; see the module docstring). `history` may be None when `p.penalized` is false."""
    logits = logits.clone()
    if p.logit_bias:
        ids, biases = p.bias_tensors
        logits.index_add_(0, ids, biases.to(logits.dtype))
    if not p.penalized:
        return logits
    assert history is not None, "penalties need the sequence so far"
    if history.num_output < p.min_tokens:
        logits[history.stop_ids] = float("-inf")
    counts = history.output_counts.to(logits.dtype)  # [V]
    if p.repetition_penalty != 1:
        seen = history.prompt_seen | (counts > 0)  # [V]
        r = p.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if p.presence_penalty or p.frequency_penalty:
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


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


def filter_logits(
    logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0
) -> torch.Tensor:
    """logits: [V] (already divided by temperature); tokens outside the bounds get -inf.
    min-p first, then top-k, then top-p over what is left (vLLM's order)."""
    if min_p > 0:
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
        logits = logits.masked_fill(logits < logits.max() + math.log(min_p), float("-inf"))
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
    histories: list[History | None] | None = None,
    grammars: list | None = None,
) -> list[Sampled]:
    """logits: [B, V] fp32, one row per sequence that samples this step; histories: per row,
    needed where its params are `penalized`; grammars: per row, a `structured.Matcher` (or
    None) whose mask comes first."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    tokens = torch.argmax(logits, dim=-1).tolist()  # [B] greedy picks
    out = []
    for b, (p, g) in enumerate(zip(params, generators, strict=True)):
        row = logits[b]  # [V]
        grammar = grammars[b] if grammars is not None else None
        if grammar is not None:
            row = grammar.mask(row)
        if p.adjusts:
            row = adjust_logits(row, p, histories[b] if histories is not None else None)
        if grammar is not None or p.adjusts:
            tokens[b] = int(torch.argmax(row))
        if not p.greedy:
            row = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p)
            tokens[b] = int(torch.multinomial(row.softmax(-1), 1, generator=g))
        top = None
        if p.logprobs:
            vals, ids = torch.topk(logprobs[b], min(p.logprobs, logprobs.shape[-1]))
            top = list(zip(ids.tolist(), vals.tolist(), strict=True))
        out.append(Sampled(tokens[b], float(logprobs[b, tokens[b]]), top))
    return out

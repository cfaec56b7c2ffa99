"""OpenAI's response shapes: completions, chunks, logprobs, usage (pure; no Ray, no FastAPI)."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.tokenizer import specials

from .openai_protocol import MIN_LOGPROB
from .textstream import Delta, TextStream, TokenInfo, token_bytes, token_text

# -- responses --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """What every object of one response shares."""

    id: str
    model: str
    created: int

    @classmethod
    def new(cls, prefix: str, model: str) -> Header:
        return cls(f"{prefix}-{secrets.token_hex(16)}", model, int(time.time()))

    def obj(self, kind: str, **fields) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            **fields,
        }


def chat_header(model: str) -> Header:
    return Header.new("chatcmpl", model)


def completion_header(model: str) -> Header:
    return Header.new("cmpl", model)


def sse(obj: Any) -> str:
    """One server-sent event; the app ends a stream with SSE_DONE."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _lp(logprob: float | None) -> float:
    return MIN_LOGPROB if logprob is None else max(float(logprob), MIN_LOGPROB)


def _chat_entry(tokenizer, token_id: int, logprob: float | None) -> dict:
    raw = token_bytes(tokenizer, token_id)
    token = raw.decode("utf-8", errors="backslashreplace")
    # a special token (EOS) is named, but adds no bytes: the text leaves it out
    text_bytes = [] if token_id in specials(tokenizer).ids else list(raw)
    return {"token": token, "logprob": _lp(logprob), "bytes": text_bytes}


def chat_logprobs(tokens: list[TokenInfo], tokenizer) -> dict:
    """`choice.logprobs` of the chat format: one entry per counted token (see textstream)."""
    content = [
        {
            **_chat_entry(tokenizer, t.token_id, t.logprob),
            "top_logprobs": [_chat_entry(tokenizer, i, lp) for i, lp in t.top_logprobs or []],
        }
        for t in tokens
    ]
    return {"content": content}


def completion_logprobs(tokens: list[TokenInfo], tokenizer) -> dict:
    """`choice.logprobs` of the completions format; each top dict holds the chosen token too.
    One entry per counted token (see textstream)."""
    names = [token_text(tokenizer, t.token_id) for t in tokens]
    tops = [
        {name: _lp(t.logprob)}
        | {token_text(tokenizer, i): _lp(lp) for i, lp in t.top_logprobs or []}
        for name, t in zip(names, tokens)
    ]
    return {
        "tokens": names,
        "token_logprobs": [_lp(t.logprob) for t in tokens],
        "top_logprobs": tops,
        "text_offset": [t.offset for t in tokens],
    }


@dataclass(frozen=True)
class Echo:
    """What completions' `echo` puts before a choice: the prompt's text and, with logprobs,
    its tokens' entries (`TokenEvent.prompt_logprobs`: None for the first token)."""

    text: str
    prompt_ids: list[int]
    logprobs: list | None = None

    def entries(self, tokenizer) -> dict:
        """The prompt's part of `choice.logprobs` (completions format)."""
        names = [token_text(tokenizer, t) for t in self.prompt_ids]
        lps = self.logprobs or [None] * len(names)
        offsets, at = [], 0
        for name in names:
            offsets.append(at)
            at += len(name)
        return {
            "tokens": names,
            "token_logprobs": [None if e is None else _lp(e[0]) for e in lps],
            "top_logprobs": [
                None
                if e is None
                else {name: _lp(e[0])} | {token_text(tokenizer, i): _lp(v) for i, v in e[1]}
                for name, e in zip(names, lps)
            ],
            "text_offset": offsets,
        }


def _with_echo(choice: dict, echo: Echo | None, tokenizer) -> dict:
    """The choice's text and logprobs with the prompt's before them."""
    if echo is None:
        return choice
    choice["text"] = echo.text + choice["text"]
    lp = choice.get("logprobs")
    if lp is not None:
        head = echo.entries(tokenizer)
        shift = len(echo.text)
        choice["logprobs"] = {
            "tokens": head["tokens"] + lp["tokens"],
            "token_logprobs": head["token_logprobs"] + lp["token_logprobs"],
            "top_logprobs": head["top_logprobs"] + lp["top_logprobs"],
            "text_offset": head["text_offset"] + [o + shift for o in lp["text_offset"]],
        }
    return choice


def _extensions(
    choice: dict, req, tokens: list[TokenInfo], prompt_ids: list[int] | None = None
) -> dict:
    """The asked-for extensions of a choice: its tokens' ids (and the prompt's, where given:
    completions), their routed experts."""
    if req.return_token_ids:
        if prompt_ids is not None:
            choice["prompt_token_ids"] = list(prompt_ids)
        choice["token_ids"] = [t.token_id for t in tokens]
    if req.return_routed_experts:
        choice["routed_experts"] = [t.routed_experts for t in tokens]
    return choice


def _prompt_ids(req, prompt_ids: list[int] | None) -> dict:
    """Chat puts `prompt_token_ids` on the response (the first chunk when streaming)."""
    return {"prompt_token_ids": list(prompt_ids)} if req.return_token_ids and prompt_ids else {}


def chat_choice(req, index: int, stream: TextStream, reason: str | None, tokenizer) -> dict:
    """One choice of a chat.completion; `reason` from `finish_reason`."""
    logprobs = chat_logprobs(stream.tokens, tokenizer) if req.logprobs else None
    message = {"role": "assistant", "content": stream.text}
    choice = {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
    return _extensions(choice, req, stream.tokens)


def chat_completion(
    header: Header, choices: list[dict], usage: dict, req=None, prompt_ids: list[int] | None = None
) -> dict:
    extra = _prompt_ids(req, prompt_ids) if req is not None else {}
    return header.obj("chat.completion", choices=choices, usage=usage, **extra)


def _chat_chunk(header: Header, choices: list[dict], **fields) -> dict:
    return header.obj("chat.completion.chunk", choices=choices, **fields)


def chat_role_chunk(header: Header, index: int, req=None, prompt_ids: list[int] | None = None):
    """The first chunk of each choice; the stream's very first one carries `prompt_ids`."""
    delta = {"role": "assistant", "content": ""}
    choice = {"index": index, "delta": delta, "logprobs": None}
    if req is not None and req.return_token_ids:
        choice["token_ids"] = []
    extra = _prompt_ids(req, prompt_ids) if req is not None else {}
    return _chat_chunk(header, [choice], **extra)


def chat_delta_chunk(header: Header, req, index: int, delta: Delta, tokenizer) -> dict | None:
    """A content chunk, or None when the delta released nothing."""
    if not delta.text and not delta.tokens:
        return None
    logprobs = chat_logprobs(delta.tokens, tokenizer) if req.logprobs else None
    choice = {"index": index, "delta": {"content": delta.text}, "logprobs": logprobs}
    return _chat_chunk(header, [_extensions(choice, req, delta.tokens)])


def chat_finish_chunk(header: Header, index: int, reason: str | None) -> dict:
    choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
    return _chat_chunk(header, [choice])


def chat_usage_chunk(header: Header, usage: dict) -> dict:
    """The last chunk when stream_options.include_usage."""
    return _chat_chunk(header, [], usage=usage)


def completion_choice(
    req,
    index: int,
    stream: TextStream,
    reason: str | None,
    tokenizer,
    prompt_ids: list[int] | None = None,
    echo: Echo | None = None,
) -> dict:
    logprobs = None if req.logprobs is None else completion_logprobs(stream.tokens, tokenizer)
    choice = {"index": index, "text": stream.text, "logprobs": logprobs, "finish_reason": reason}
    return _extensions(_with_echo(choice, echo, tokenizer), req, stream.tokens, prompt_ids)


def completion_response(header: Header, choices: list[dict], usage: dict) -> dict:
    return header.obj("text_completion", choices=choices, usage=usage)


def completion_chunk(
    header: Header,
    req,
    index: int,
    delta: Delta,
    tokenizer,
    reason: str | None = None,
    prompt_ids: list[int] | None = None,
    echo: Echo | None = None,
    shift: int = 0,
) -> dict | None:
    """A streamed piece of one choice; None when there is neither text nor a finish_reason.
    `prompt_ids` and `echo`: given for the choice's first chunk; `shift`: for the later ones
    of an echoed choice, the length of its prompt's text (the logprobs' text offsets)."""
    if not delta.text and not delta.tokens and reason is None and echo is None:
        return None
    logprobs = None if req.logprobs is None else completion_logprobs(delta.tokens, tokenizer)
    choice = {"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": reason}
    if logprobs is not None and shift:
        logprobs["text_offset"] = [o + shift for o in logprobs["text_offset"]]
    choice = _extensions(_with_echo(choice, echo, tokenizer), req, delta.tokens, prompt_ids)
    return header.obj("text_completion", choices=[choice])


def completion_usage_chunk(header: Header, usage: dict) -> dict:
    return header.obj("text_completion", choices=[], usage=usage)


# -- usage and parameter counts ---------------------------------------------------------------


@lru_cache(maxsize=16)
def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of the language model; active counts top_k routed
    experts of each layer (text experts: generated tokens are text). A VL model's vision tower
    and resampler are not counted."""
    h, v = cfg.hidden_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    bias = cfg.use_bias
    attn = h * (2 * q + 2 * kv) + (q + 2 * kv + h if bias else 0) + 2 * h  # qkvo + 2 norms
    expert = 3 * h * cfg.moe_intermediate_size  # gate, up, down; routed experts have no bias
    shared = cfg.num_shared_experts * expert + (
        (2 * cfg.num_shared_experts * cfg.moe_intermediate_size + h) if bias else 0
    )
    router = cfg.num_experts * h + cfg.num_experts  # gate + correction bias
    dense = 3 * h * cfg.intermediate_size + ((2 * cfg.intermediate_size + h) if bias else 0)
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.num_layers - n_moe
    head = (0 if cfg.tie_word_embeddings else v * h) + (v if bias else 0)
    common = v * h + head + h + cfg.num_layers * attn + n_dense * dense + n_moe * (shared + router)
    widths = sum(cfg.expert_width(e) for e in range(cfg.num_experts))  # VL: two widths
    total = common + n_moe * 3 * h * widths
    active = common + n_moe * cfg.top_k * expert  # a generated token is text: text experts
    return total, active


def usage(prompt_tokens: int, completion_tokens: int, model_cfg: ModelConfig) -> dict:
    """OpenAI's usage plus `active_params_per_token` and `flops`.

    flops = 2 x (parameters each token multiplies by) x tokens: the weight matmuls of
    prompt and output tokens, attention scores excluded. The input embedding is a lookup, so
    an untied embedding table is left out; a tied one counts once, as the lm_head.
    `dense_equivalent` is the same for a dense model with every expert active.
    """
    total, active = param_counts(model_cfg)
    lookup = 0 if model_cfg.tie_word_embeddings else model_cfg.vocab_size * model_cfg.hidden_size
    tokens = prompt_tokens + completion_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": tokens,
        "active_params_per_token": active,
        "flops": {
            "spent": 2 * (active - lookup) * tokens,
            "dense_equivalent": 2 * (total - lookup) * tokens,
        },
    }

"""What the engine tells the outside about a request: one `TokenEvent` per token or ending.

An error carries a *kind* (what went wrong, in the engine's terms), never an HTTP status: the
HTTP edge maps kinds to statuses, the CLI to exit messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ErrorKind(str, Enum):
    INVALID = "invalid_request"  # the request itself cannot be served: bad ids, too long
    OVERLOADED = "overloaded"  # no room now (queue full); the same request may succeed later
    UNAVAILABLE = "unavailable"  # expert workers or the engine are down; retry shortly
    INTERNAL = "internal"  # a bug: an engine step raised


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None  # None when the request ended without a new token (abort, error)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    routed_experts: list[list[int]] | None = None  # [moe_layers][k] for this token
    finish_reason: str | None = None  # stop, length, abort, error
    error: str | None = None  # why, when finish_reason is "error" (or an abort has a reason)
    error_kind: ErrorKind | None = None  # with an error: what kind of failure it is
    # on a request's first token, when asked: per prompt position, None for the first token,
    # then (logprob of the prompt's token, [(token_id, logprob)] most likely first)
    prompt_logprobs: list | None = None


def error_event(request_id: str, kind: ErrorKind, message: str) -> TokenEvent:
    return TokenEvent(request_id, None, finish_reason="error", error=message, error_kind=kind)

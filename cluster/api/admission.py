"""Admission: the work one request may create, bounded before anything is submitted.

In order: completions per request (prompts x n) and tokens per request (prompt + max_tokens,
times n) are 400s; the API key's rate limit (a 429 from the shared `RateLimiter`); this ingress
replica's engine requests in flight (a 429 with a short Retry-After). A request refused here
never reaches the gateway.
"""

from __future__ import annotations

from ..config import ServeArgs
from . import openai_protocol as op
from .http_app import too_many


class Admission:
    def __init__(self, args: ServeArgs, limiter=None):
        self.args = args
        self.limiter = limiter  # a handle to the RateLimiter deployment, when keys have limits

    def check_choices(self, num_prompts: int, n: int) -> int:
        """The request's completions (prompts x n); 400 past the limit."""
        if num_prompts * n > self.args.max_choices_per_request:
            raise op.bad_request(
                f"this request asks for {num_prompts * n} completions ({num_prompts} prompts "
                f"x n={n}); this server allows at most {self.args.max_choices_per_request}",
                param="n",
            )
        return num_prompts * n

    async def admit(
        self, key: str | None, prompts: list[list[int]], req, context: int, inflight: int
    ) -> None:
        """400 past the per-request limits, 429 past the key's rate or the in-flight bound."""
        n = self.check_choices(len(prompts), req.n)
        most = req.requested_max_tokens
        max_tokens = max(
            most if most is not None else self.args.default_max_tokens, req.min_tokens or 0, 1
        )
        tokens = sum(len(p) + min(max_tokens, context - len(p)) for p in prompts) * req.n
        if tokens > self.args.max_request_tokens:
            raise op.bad_request(
                f"this request may use {tokens} tokens (prompts + max_tokens, times n); "
                f"this server allows at most {self.args.max_request_tokens} per request",
                param="max_tokens",
            )
        if self.limiter is not None and key is not None:
            await self._rate_limit(key, tokens)
        if inflight + n > self.args.max_inflight:
            raise too_many(
                f"the server is at capacity ({inflight} requests in flight); retry shortly", 0.5
            )

    async def _rate_limit(self, key: str, tokens: int) -> None:
        over = await self.limiter.acquire.remote(key, tokens)
        if over is not None:
            raise too_many(
                f"rate limit reached for {over['limit']}: {over['per_minute']} per minute "
                f"for this API key; retry in {over['retry_after_s']:.2f}s",
                over["retry_after_s"],
                type=over["limit"],
                code="rate_limit_exceeded",
            )

"""API keys with per-key limits, and the one rate limiter every ingress replica asks.

A key entry is `KEY` or `KEY:rpm=N:tpm=M` (requests and tokens per minute; either may be left
out). Entries come from `--api-key` (repeatable), `EXPERTMESH_API_KEYS` (comma-separated) and
`--api-keys-file` (one entry per line, `#` comments). The counts live in one small Serve
deployment (`RateLimiter`) so that the limits hold across ingress replicas. Each limit is a
token bucket refilled continuously: a full minute's allowance at most, and the wait until
enough has refilled is the Retry-After.

Tokens are charged at admission, as an estimate of what the request may use: its prompt
tokens plus max_tokens for each choice (what OpenAI's token limits count too).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KeyLimits:
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute


def parse_key_entry(entry: str) -> tuple[str, KeyLimits]:
    """`KEY[:rpm=N][:tpm=M]` -> (KEY, limits); raises ValueError naming what is wrong."""
    key, *options = entry.strip().split(":")
    if not key:
        raise ValueError(f"API key entry {entry!r} has an empty key")
    limits: dict[str, int] = {}
    for opt in options:
        name, _, value = opt.partition("=")
        if name not in ("rpm", "tpm") or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"API key entry for {key[:4]}...: {opt!r} is not rpm=N or tpm=N (N >= 1)"
            )
        limits[name] = int(value)
    return key, KeyLimits(**limits)


def load_keys(entries: list[str], keys_file: str | None = None) -> dict[str, KeyLimits]:
    """Every accepted key and its limits: flags, then EXPERTMESH_API_KEYS, then the file."""
    raw = list(entries)
    raw += [e for e in os.environ.get("EXPERTMESH_API_KEYS", "").split(",") if e.strip()]
    if keys_file:
        for line in Path(keys_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                raw.append(line)
    return dict(parse_key_entry(e) for e in raw)


class _Bucket:
    def __init__(self, per_minute: int, now: float):
        self.rate = per_minute / 60.0  # refill per second
        self.capacity = float(per_minute)
        self.level, self.at = float(per_minute), now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0: now); an amount above a minute's allowance
        is capped at the full bucket, so one large request is slow but never refused forever."""
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        amount = min(amount, self.capacity)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= min(amount, self.capacity)


class RateLimiter:
    """The shared counts: one replica, asked once per request by every ingress replica."""

    def __init__(self, limits: dict[str, dict]):
        self.limits = {k: KeyLimits(**v) for k, v in limits.items()}
        self.buckets: dict[tuple[str, str], _Bucket] = {}

    def _bucket(self, key: str, kind: str, per_minute: int, now: float) -> _Bucket:
        b = self.buckets.get((key, kind))
        if b is None:
            b = self.buckets[(key, kind)] = _Bucket(per_minute, now)
        return b

    def acquire(self, key: str, tokens: int) -> dict | None:
        """Charge one request of `tokens` to `key`; None if allowed, else why and how long to
        wait: {"limit": "requests" | "tokens", "per_minute": N, "retry_after_s": s}."""
        lim = self.limits.get(key)
        if lim is None:
            return None
        now = time.monotonic()
        wanted = [("requests", lim.rpm, 1), ("tokens", lim.tpm, tokens)]
        buckets = []
        for kind, per_minute, amount in wanted:
            if per_minute is None:
                continue
            b = self._bucket(key, kind, per_minute, now)
            wait = b.wait_for(amount, now)
            if wait > 0:
                return {"limit": kind, "per_minute": per_minute, "retry_after_s": wait}
            buckets.append((b, amount))
        for b, amount in buckets:
            b.take(amount)
        return None

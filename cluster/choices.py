"""One choice of a request, streamed from the gateway deployment and turned into text.

A choice is one engine request. Its first batch of events is awaited before the HTTP response
starts, so a refusal (400, 429, 503) becomes the response status rather than a broken stream.
A stop string (the engine never sees those) or a closed stream aborts the engine request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from expertmesh.router.sampling import SamplingParams

from . import openai_protocol as op
from .textstream import Delta, TextStream


def _merge(a: Delta, b: Delta) -> Delta:
    return Delta(a.text + b.text, a.tokens + b.tokens, a.stopped or b.stopped)


class Choice:
    def __init__(
        self, gateway, prompt: list[int], params: SamplingParams, stream: TextStream, index: int
    ):
        self.index, self.stream = index, stream
        self.request_id = uuid.uuid4().hex
        self._gen = gateway.options(stream=True).generate.remote(
            prompt, dataclasses.asdict(params), self.request_id
        )
        self._first: list[dict] | None = None
        self.first_token_at: float | None = None
        self.token_times: list[float] = []

    async def start(self) -> None:
        """Wait for the first events; raise the APIError of a refused request."""
        self._first = await self._gen.__anext__()
        head = self._first[0]
        if head["finish_reason"] == "error" or (head["token_id"] is None and head.get("error")):
            self.cancel()
            raise op.error_for_event(head)

    async def deltas(self) -> AsyncIterator[tuple[Delta, str | None]]:
        """(new text and tokens, finish_reason or None) until the choice ends."""
        batch = self._first or []
        self._first = None
        while True:
            for ev in batch:
                out = self._take(ev)
                if out is not None:
                    yield out
                    if out[1] is not None:
                        return
            batch = await self._gen.__anext__()

    def _take(self, ev: dict) -> tuple[Delta, str | None] | None:
        if ev["finish_reason"] == "error":
            raise op.error_for_event(ev)
        if ev["token_id"] is not None:
            now = time.monotonic()
            self.first_token_at = self.first_token_at or now
            self.token_times.append(now)
        delta = self.stream.push_event(ev)
        if delta.stopped:  # a stop string: the engine does not know, so end it here
            self.cancel()
            return _merge(delta, self.stream.finish()), "stop"
        if ev["finish_reason"] is not None:
            return _merge(delta, self.stream.finish()), op.finish_reason(
                ev["finish_reason"], self.stream
            )
        return delta, None

    async def run_to_end(self) -> str | None:
        last = None
        async for _, reason in self.deltas():
            last = reason
        return last

    def cancel(self) -> None:
        try:
            self._gen.cancel()
        except Exception:
            pass


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Delta, str | None]]:
    """The deltas of several choices as they come; all are cancelled if the consumer stops."""
    if len(choices) == 1:
        async for delta, reason in choices[0].deltas():
            yield choices[0], delta, reason
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice):
        try:
            async for delta, reason in c.deltas():
                await queue.put((c, delta, reason))
        except Exception as e:
            await queue.put(e)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        done = 0
        while done < len(choices):
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            done += item[2] is not None
            yield item
    finally:
        for t in tasks:
            t.cancel()
        for c in choices:
            c.cancel()

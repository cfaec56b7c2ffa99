"""Multiplexed streams from the gateway: one per ingress replica, fanned out to the choices.

A choice is one engine request. Its first batch of events is awaited before the HTTP response
starts, so a refusal (400, 429, 503) becomes the response status rather than a broken stream.
A stop string (the engine never sees those) or a closed stream aborts the engine request.

Events travel multiplexed: each ingress replica holds one long-lived stream from the gateway
(`Mux`), which carries a whole step's tokens for all of its requests in one item, and fans them
out to per-request queues. (The gateway deployment has one replica, so `submit` and `channel`
calls reach the same one.)
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator

from expertmesh.router.events import ErrorKind, TokenEvent, error_event
from expertmesh.router.sampling import SamplingParams

from . import openai_protocol as op
from .textstream import Delta, TextStream

log = logging.getLogger(__name__)


class Mux:
    """This ingress replica's one event stream from the gateway, fanned out to its requests."""

    def __init__(self, gateway):
        self.gateway = gateway
        self.channel_id = uuid.uuid4().hex
        self.queues: dict[str, asyncio.Queue] = {}
        self._task: asyncio.Task | None = None
        self._aborts: set[asyncio.Task] = set()

    def open(self, request_id: str) -> asyncio.Queue:
        if self._task is None or self._task.done():
            # A fresh context: the stream belongs to this replica, not to the request that
            # happened to open it, so Serve does not cancel it when that request is cancelled.
            self._task = asyncio.create_task(self._pump(), context=contextvars.Context())
        queue = self.queues[request_id] = asyncio.Queue()
        return queue

    def close(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort in the background (callable from a closing generator); the task is kept."""
        # a fresh context: Serve cancels the calls a cancelled request made, and this abort
        # is made because the request was cancelled (its client went away)
        task = asyncio.get_running_loop().create_task(
            self._abort(request_id), context=contextvars.Context()
        )
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, request_id: str) -> None:
        try:
            await self.gateway.abort.remote(request_id)
        except Exception as e:
            log.warning("abort of %s failed: %s", request_id, e)

    async def _pump(self) -> None:
        try:
            stream = self.gateway.options(stream=True).channel.remote(self.channel_id)
            async for batch in stream:
                for ev in batch:
                    queue = self.queues.get(ev.request_id)
                    if queue is not None:
                        queue.put_nowait(ev)
        except Exception as e:
            log.error("the gateway stream ended: %s", e)
        for rid, queue in list(self.queues.items()):  # whatever was open cannot finish now
            queue.put_nowait(
                error_event(rid, ErrorKind.UNAVAILABLE, "lost the stream from the gateway")
            )


def _merge(a: Delta, b: Delta) -> Delta:
    return Delta(a.text + b.text, a.tokens + b.tokens, a.stopped or b.stopped)


class Choice:
    def __init__(
        self,
        gateway,
        mux: Mux,
        prompt: list[int],
        params: SamplingParams,
        stream: TextStream,
        index: int,
        images=None,
    ):
        self.index, self.stream = index, stream
        self.request_id = uuid.uuid4().hex
        self._gateway, self._mux = gateway, mux
        self._queue = mux.open(self.request_id)
        self._submitted = gateway.submit.remote(
            prompt, params, self.request_id, mux.channel_id, images
        )
        self._first: list[TokenEvent] | None = None
        self.finished = False
        self.first_token_at: float | None = None
        self.token_times: list[float] = []

    async def _next_batch(self) -> list[TokenEvent]:
        batch = [await self._queue.get()]
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def start(self) -> None:
        """Wait for the first events; raise the APIError of a refused request."""
        refusal = await self._submitted
        if refusal is None:
            self._first = await self._next_batch()
            head = self._first[0]
            if head.finish_reason == "error" or (head.token_id is None and head.error):
                refusal = head
        if refusal is not None:
            self.finished = True
            self.cancel()
            raise op.error_for_event(refusal)

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
            batch = await self._next_batch()

    def _take(self, ev: TokenEvent) -> tuple[Delta, str | None] | None:
        if ev.finish_reason is not None:
            self.finished = True
        if ev.finish_reason == "error":
            raise op.error_for_event(ev)
        if ev.token_id is not None:
            now = time.monotonic()
            self.first_token_at = self.first_token_at or now
            self.token_times.append(now)
        delta = self.stream.push_event(ev)
        if delta.stopped:  # a stop string: the engine does not know, so end it here
            self.cancel()
            return _merge(delta, self.stream.finish()), "stop"
        if ev.finish_reason is not None:
            return _merge(delta, self.stream.finish()), op.finish_reason(
                ev.finish_reason, self.stream
            )
        return delta, None

    async def run_to_end(self) -> str | None:
        last = None
        async for _, reason in self.deltas():
            last = reason
        return last

    def cancel(self) -> None:
        """Stop listening; abort the engine request unless it already ended."""
        self._mux.close(self.request_id)
        if not self.finished:
            self.finished = True
            self._mux.abort(self.request_id)


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

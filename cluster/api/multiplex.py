"""Multiplexed streams from the gateways, fanned out to the choices; failover between gateways.

A choice is one engine request. Its first batch of events is awaited before the HTTP response
starts, so a refusal (400, 429, 503) becomes the response status rather than a broken stream.
A stop string (the engine never sees those) or a closed stream aborts the engine request.

Each ingress replica holds one long-lived stream per gateway replica (`GatewayMux`), which
carries a whole step's tokens for all of its requests on that gateway in one item. A request
goes to the least-loaded gateway (`routing.GatewayRouter`); the call that submits it stays open
while it runs, and tells which replica took it, so its events are read from that replica's
stream.

Failover: a gateway whose stream fails (its process died) or stays silent past
`gateway_timeout_s` (hung: a live gateway sends an empty batch every second) is left out of
routing, and each of its unfinished requests is submitted again, to a live gateway, with the
tokens this ingress has already received from it: the new gateway recomputes that prefix and
continues. Seeded draws depend only on (seed, position) and every request has a seed, so the
client's stream goes on with the very tokens it would have had.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator

from expertmesh.router.events import ErrorKind, TokenEvent, error_event
from expertmesh.router.sampling import SamplingParams

from . import openai_protocol as op
from .routing import known_replicas, suspect, suspected
from .textstream import Delta, TextStream

log = logging.getLogger(__name__)
WATCH_S = 0.5  # how often the watchdog looks for silent gateways and new replicas


def detached(coro) -> asyncio.Task:
    """Run `coro` as a task outside the current Serve request's context.

    Calls made inside a request inherit its internal request id, and concurrent calls with one
    id confuse a router that matches replies to calls by that id (ours pins calls to replicas);
    Serve also cancels them with the request, where we abort explicitly instead. Awaiting the
    task still cancels it along with the awaiting request."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


@dataclasses.dataclass
class Track:
    """One engine request as this ingress follows it, across gateways."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    images: object
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    replica: str | None = None  # the gateway replica running it now
    received: list[int] = dataclasses.field(default_factory=list)  # output tokens so far
    finished: bool = False
    moves: int = 0  # failovers so far
    call: object = None  # the open `run` call on its gateway
    # events that came before the gateway's answer said which replica took the request
    early: dict[str, list[TokenEvent]] = dataclasses.field(default_factory=dict)


class GatewayMux:
    """This ingress replica's streams from the gateway replicas, fanned out to its requests."""

    max_moves = 3  # a request that lost this many gateways ends with an error

    def __init__(self, gateway, timeout_s: float = 5.0):
        self.gateway = gateway
        self.timeout_s = timeout_s
        self.channel_id = uuid.uuid4().hex
        self.tracks: dict[str, Track] = {}
        self._pumps: dict[str, asyncio.Task] = {}  # gateway replica -> its stream's reader
        self._seen: dict[str, float] = {}  # gateway replica -> when it last sent anything
        self._watch: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def queues(self) -> dict[str, Track]:  # requests in flight (admission counts them)
        return self.tracks

    # -- requests -----------------------------------------------------------------------------

    async def open(self, prompt, params: SamplingParams, images=None) -> Track:
        """Submit a request to the least-loaded gateway; its first answer (a refusal or None)
        is the first item of its queue when refused."""
        if params.seed is None and not params.greedy:  # a seed makes it resumable elsewhere
            params = dataclasses.replace(params, seed=random.randrange(2**63))
        track = Track(uuid.uuid4().hex, list(prompt), params, images)
        self.tracks[track.request_id] = track
        self._ensure_watch()
        refusal = await self._submit(track)
        if refusal is not None:
            track.finished = True
            track.queue.put_nowait(refusal)
        return track

    async def _submit(self, track: Track, attempts: int = 3) -> TokenEvent | None:
        """Hand `track` to a gateway (least loaded, not suspected); an error event if refused.
        A gateway that fails to answer (it died or hung meanwhile) gets the next attempt
        routed elsewhere: by then Serve has dropped a dead replica, the watchdog a hung one."""
        for attempt in range(attempts):
            answered, refusal = await self._submit_once(track)
            if answered:
                return refusal
            if attempt + 1 < attempts:
                await asyncio.sleep(0.5 * (attempt + 1))
        return refusal

    async def _submit_once(self, track: Track) -> tuple[bool, TokenEvent | None]:
        """(whether a gateway answered, its refusal or None)."""
        call = self.gateway.options(stream=True).run.remote(
            track.prompt,
            track.params,
            track.request_id,
            self.channel_id,
            track.images,
            list(track.received),
        )
        try:
            first = await asyncio.wait_for(anext(call), self.timeout_s * 2)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as e:
            call.cancel()
            reason = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
            log.warning("submitting %s failed: %s", track.request_id, reason)
            message = "no gateway answered; retry shortly"
            return False, error_event(track.request_id, ErrorKind.UNAVAILABLE, message)
        if first["refusal"] is None:
            track.replica, track.call = first["replica"], call
            early, track.early = track.early.get(track.replica, []), {}
            for ev in early:
                self._deliver(track.replica, ev)
            self._ensure_pump(first["replica"])
        return True, first["refusal"]

    def close(self, request_id: str) -> None:
        track = self.tracks.pop(request_id, None)
        if track is not None and track.call is not None:
            track.call.cancel()

    def abort(self, request_id: str, track: Track | None = None) -> None:
        """Abort in the background (callable from a closing generator)."""
        track = self.tracks.pop(request_id, None) or track
        if track is None or track.replica is None:
            return
        if track.call is not None:
            track.call.cancel()  # the gateway aborts a request whose call is cancelled
        # and say so explicitly: a fresh context, since Serve cancels the calls a cancelled
        # request made, and this abort is made because the request was cancelled
        self._spawn(self._abort(track.request_id, track.replica))

    async def _abort(self, request_id: str, replica: str) -> None:
        try:
            await self.gateway.options(session_id=replica).abort.remote(request_id)
        except Exception as e:
            log.info("abort of %s on %s: %s", request_id, replica, e)

    # -- streams ------------------------------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        # detached: these belong to this replica, not to the request that happened to start
        # them, so Serve does not cancel them when that request is cancelled
        task = detached(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _ensure_watch(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = self._spawn(self._watchdog())

    def _ensure_pump(self, replica: str) -> None:
        task = self._pumps.get(replica)
        if task is None or task.done():
            self._seen[replica] = time.monotonic()
            self._pumps[replica] = self._spawn(self._pump(replica))

    async def _pump(self, replica: str) -> None:
        try:
            stream = self.gateway.options(stream=True, session_id=replica).channel.remote(
                self.channel_id
            )
            async for batch in stream:
                self._seen[replica] = time.monotonic()
                for ev in batch:
                    self._deliver(replica, ev)
            cause = "its stream ended"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            cause = f"its stream failed: {type(e).__name__}"
        self._spawn(self._fail(replica, cause))

    def _deliver(self, replica: str, ev: TokenEvent) -> None:
        track = self.tracks.get(ev.request_id)
        if track is None:  # gone
            return
        if track.replica is None:  # being submitted: which replica took it is not known yet
            track.early.setdefault(replica, []).append(ev)
            return
        if track.replica != replica:  # moved to another gateway
            return
        if ev.token_id is not None:
            track.received.append(ev.token_id)
        if ev.finish_reason is not None:
            track.finished = True
        track.queue.put_nowait(ev)

    async def _watchdog(self) -> None:
        """Open a stream to every gateway replica (so that a hung idle one is noticed too), and
        fail over the requests of one that stays silent past the timeout."""
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                for replica in known_replicas():
                    if not suspected(replica):
                        self._ensure_pump(replica)
                now = time.monotonic()
                for replica, task in list(self._pumps.items()):
                    if not task.done() and now - self._seen[replica] > self.timeout_s:
                        task.cancel()
                        await self._fail(replica, f"silent for {now - self._seen[replica]:.1f}s")
            except Exception:
                log.exception("gateway watchdog")

    async def _fail(self, replica: str, cause: str) -> None:
        """Move every unfinished request of `replica` to a live gateway."""
        task = self._pumps.pop(replica, None)
        if task is not None and not task.done():
            task.cancel()
        moving = [t for t in self.tracks.values() if t.replica == replica and not t.finished]
        if replica in known_replicas() or moving:
            log.warning("gateway %s failed (%s); moving %d requests", replica, cause, len(moving))
            suspect(replica)
        await asyncio.gather(*(self._move(t) for t in moving))

    async def _move(self, track: Track) -> None:
        old, track.replica, track.early = track.replica, None, {}
        if track.call is not None:
            track.call.cancel()
            track.call = None
        track.moves += 1
        refusal = None
        if track.moves > self.max_moves:
            refusal = error_event(
                track.request_id, ErrorKind.UNAVAILABLE, "lost too many gateways; retry"
            )
        else:
            refusal = await self._submit(track)
        if track.request_id not in self.tracks:  # its client left meanwhile
            if refusal is None:
                self.abort(track.request_id, track)
            return
        if refusal is not None:
            log.warning("request %s could not move off %s: %s", track.request_id, old, refusal)
            track.finished = True
            track.queue.put_nowait(refusal)


def _merge(a: Delta, b: Delta) -> Delta:
    return Delta(a.text + b.text, a.tokens + b.tokens, a.stopped or b.stopped)


class Choice:
    def __init__(
        self,
        mux: GatewayMux,
        prompt: list[int],
        params: SamplingParams,
        stream: TextStream,
        index: int,
        images=None,
    ):
        self.index, self.stream = index, stream
        self._mux = mux
        self._opening = detached(mux.open(prompt, params, images))  # submits now
        self._queue: asyncio.Queue | None = None
        self.request_id: str | None = None
        self._first: list[TokenEvent] | None = None
        self.finished = False
        self.first_token_at: float | None = None
        self.prompt_logprobs: list | None = None  # from the first token's event, when asked
        self.token_times: list[float] = []

    async def _next_batch(self) -> list[TokenEvent]:
        batch = [await self._queue.get()]
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def start(self) -> None:
        """Wait for the first events; raise the APIError of a refused request."""
        track = await self._opening
        self.request_id, self._queue = track.request_id, track.queue
        refusal = None
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
        if ev.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = ev.prompt_logprobs  # a resumed request sends them again
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
        if self.request_id is None:  # not started: the submission may still be under way
            self.finished = True
            if not self._opening.done():
                self._opening.cancel()
            elif not self._opening.cancelled() and self._opening.exception() is None:
                track = self._opening.result()
                self._mux.abort(track.request_id, track)
            return
        if not self.finished:
            self.finished = True
            self._mux.abort(self.request_id)
        self._mux.close(self.request_id)


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

"""The engine loop in its own thread: requests come in through a queue, tokens go out by callback.

The engine itself is single-threaded; only this thread touches it. torch releases the GIL
while it computes, so the caller's event loop keeps answering. A `Rebalancer`, when given,
ticks here between two steps (it switches the dispatcher's placement there); `call` runs any
other function at that point.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from .dispatch import WorkerUnavailable
from .engine import LLMEngine, RequestError
from .events import ErrorKind, TokenEvent, error_event
from .rebalance import Rebalancer
from .sampling import SamplingParams

log = logging.getLogger(__name__)

OnEvent = Callable[[TokenEvent], None]
TICK_S = 0.02  # how often an idle loop ticks the rebalancer while a move is in flight


class EngineLoop:
    def __init__(self, engine: LLMEngine, rebalancer: Rebalancer | None = None):
        self.engine = engine
        self.rebalancer = rebalancer
        self._inbox: queue.Queue = queue.Queue()
        self._listeners: dict[str, OnEvent] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # -- called from any thread -------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_event: OnEvent,
        images=None,
        resume_ids: Sequence[int] = (),
    ) -> None:
        """Queue a request; its tokens (or an error event) arrive through `on_event`.
        images (VL): as `LLMEngine.add_request` takes them (preprocessed is cheaper here).
        resume_ids: output tokens it already has (it moved here from another gateway)."""
        cmd = ("add", request_id, list(prompt_ids), params, on_event, images, list(resume_ids))
        self._inbox.put(cmd)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def drain(self, message: str) -> None:
        """End every request (running, waiting or queued) with an UNAVAILABLE error event."""
        self._inbox.put(("drain", message))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the loop thread between two steps; its result (or error) comes back
        through the future."""
        future: Future = Future()
        self._inbox.put(("call", fn, future))
        return future

    def stop(self, timeout: float = 30) -> None:
        self._stopped.set()
        self._inbox.put(("stop",))
        self._thread.join(timeout)
        if self.rebalancer is not None:
            self.rebalancer.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests; a racy read, fine for metrics."""
        return self.engine.num_running, self.engine.num_waiting + self._inbox.qsize()

    # -- the loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_work()
            moving = self.rebalancer is not None and self.rebalancer.busy
            try:
                self._handle(self._inbox.get(block=block, timeout=TICK_S if moving else None))
                while True:  # take everything that queued up
                    self._handle(self._inbox.get_nowait())
            except queue.Empty:
                pass
            self._tick()
            if self.engine.has_work() and not self._stopped.is_set():
                self._deliver(self._step())
        for rid in list(self._listeners):
            self._deliver([error_event(rid, ErrorKind.UNAVAILABLE, "the engine stopped")])

    def _step(self) -> list[TokenEvent]:
        try:
            return self.engine.step()
        except WorkerUnavailable as e:
            log.error("step failed, ending its requests: %s", e)
            return self.engine.fail_running(f"expert workers unavailable: {e}")
        except Exception as e:  # never let one bad step kill the loop
            log.exception("engine step failed")
            return self.engine.fail_running(f"internal error: {e}", ErrorKind.INTERNAL)

    def _tick(self) -> None:
        if self.rebalancer is None:
            return
        try:
            self.rebalancer.tick()
        except Exception:  # a failed expert move must not stop the loop
            log.exception("expert rebalancing failed")

    def _handle(self, cmd: tuple) -> None:
        if cmd[0] == "call":
            _, fn, future = cmd
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)
        elif cmd[0] == "add":
            _, rid, prompt, params, on_event, images, resume_ids = cmd
            if rid in self._listeners:
                on_event(error_event(rid, ErrorKind.INVALID, f"duplicate request id {rid!r}"))
                return
            try:
                self.engine.add_request(rid, prompt, params, images, resume_ids)
            except RequestError as e:
                on_event(error_event(rid, ErrorKind.INVALID, str(e)))
                return
            self._listeners[rid] = on_event
        elif cmd[0] == "drain":
            for rid in list(self._listeners):
                self.engine.abort(rid)
                self._deliver([error_event(rid, ErrorKind.UNAVAILABLE, cmd[1])])
        elif cmd[0] == "abort":
            rid = cmd[1]
            if self.engine.abort(rid) and rid in self._listeners:
                self._deliver([TokenEvent(rid, None, finish_reason="abort")])

    def _deliver(self, events: list[TokenEvent]) -> None:
        for ev in events:
            listener = self._listeners.get(ev.request_id)
            if listener is None:
                continue
            if ev.finish_reason is not None:
                del self._listeners[ev.request_id]
            try:
                listener(ev)
            except Exception:
                log.exception("listener of %s failed", ev.request_id)

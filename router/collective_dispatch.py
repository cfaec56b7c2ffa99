"""The collective transport, gateway side: all-to-alls over a torch.distributed group.

The gateway is rank 0 of a group with the N expert workers (`CollectiveWorker`, rank w + 1 for
shard w). `_send` starts a layer's three all-to-alls (header, rows, results; see
`expertmesh.workers.collective`) and returns; `_receive` waits for the results without
spinning, asking `liveness()` which workers are dead while it waits, so a dead worker fails the
exchange in well under a second rather than at a socket timeout.

Every exchange involves every worker, with zero rows for those not chosen, so the workers'
loops stay in lockstep. A group that failed once is not used again: `rebuild(port)` drops it
(the surviving workers' blocked ops then fail and their `serve()` returns) and hosts a fresh
one, which every worker must join; a gloo or NCCL group cannot replace a rank.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from expertmesh.ernie.devices import dtype_code
from expertmesh.workers.collective import (
    HEADER,
    Command,
    Group,
    done_event,
    open_group,
    pack_rows,
)
from expertmesh.workers.placement import ExpertPlacement

from .dispatch import Dispatcher, Pending, WorkerFailure, WorkerRows, WorkerUnavailable

log = logging.getLogger(__name__)


@dataclass
class _Exchange:
    """One layer in flight: its ops, where the results land, and how many rows each worker has."""

    counts: list[int]  # rows per worker
    out: torch.Tensor | None = None  # [sum(counts), H] results, in worker order
    works: list = field(default_factory=list)
    done: threading.Event | None = None  # set when all ops finished or one failed
    started: float = 0.0
    error: str | None = None  # the group was broken before this layer was sent


class CollectiveDispatcher(Dispatcher):
    """Rank 0 of a collective group over the expert workers."""

    poll_s = 0.05  # how often to ask liveness() while waiting for results
    blame_s = 1.0  # after an op error, how long liveness() may take to name the dead

    def __init__(
        self,
        placement: ExpertPlacement,
        master_addr: str,
        master_port: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 30.0,
        liveness: Callable[[], set[int]] | None = None,
    ):
        super().__init__(placement)
        if world_size != placement.num_shards + 1:
            raise ValueError(
                f"world_size={world_size}: expected the gateway plus {placement.num_shards} workers"
            )
        self.master_addr, self.master_port = master_addr, master_port
        self.world_size, self.backend, self.timeout_s = world_size, backend, timeout_s
        self.liveness = liveness  # -> indices of dead workers
        self.group: Group | None = None
        self.broken: str | None = None  # why the current group can no longer be used

    @property
    def num_workers(self) -> int:
        return self.world_size - 1

    # -- membership ---------------------------------------------------------------------------

    def connect(self) -> None:
        """Host the group as rank 0; blocks until every worker has joined (they join meanwhile)."""
        t0 = time.monotonic()
        addr, port = self.master_addr, self.master_port
        try:
            self.group = open_group(addr, port, 0, self.world_size, self.backend, self.timeout_s)
        except (RuntimeError, OSError) as e:  # a worker missing, the port taken
            raise WorkerUnavailable(f"no collective group on {addr}:{port}: {e}") from e
        self.broken = None
        took = time.monotonic() - t0
        log.info(
            "collective group of %d ranks on %s:%d in %.2fs", self.world_size, addr, port, took
        )

    def rebuild(self, master_port: int) -> None:
        """Drop the current group and host a fresh one on `master_port` (workers rejoin it)."""
        self._drop_group()
        self.master_port = master_port
        self.connect()

    def close(self) -> None:
        """Tell every worker to shut down, then drop the group."""
        if self.group is not None and self.broken is None:
            try:
                work = self._send_headers([[Command.SHUTDOWN, 0, 0, 0, 0, 0]] * self.num_workers)
                if not done_event([work]).wait(self.timeout_s):
                    self.group.retire([work])
                else:
                    work.wait()
            except RuntimeError as e:
                log.warning("collective close: shutdown not delivered: %s", e)
        self._drop_group()

    def _drop_group(self) -> None:
        if self.group is not None:
            self.group.release()
            self.group = None
        self.broken = "no group"

    # -- one layer ----------------------------------------------------------------------------

    def _send(self, layer: int, parts: dict[int, WorkerRows]) -> _Exchange:
        counts = [len(parts[w].rows) if w in parts else 0 for w in range(self.num_workers)]
        ex = _Exchange(counts, started=time.monotonic())
        if self.broken is not None:
            ex.error = self.broken
            return ex
        if not parts:  # no tokens: nothing to exchange, on any rank
            return ex
        try:
            self._start(layer, parts, ex)
        except RuntimeError as e:  # posting on a group whose peer is gone
            self._fail_later(ex, str(e))
        return ex

    def _start(self, layer: int, parts: dict[int, WorkerRows], ex: _Exchange) -> None:
        g, n = self.group, ex.counts
        first = next(iter(parts.values()))
        hidden, k, dtype = first.x.shape[1], first.expert_ids.shape[1], first.x.dtype
        code = dtype_code(dtype)
        ex.works.append(self._send_headers([[Command.LAYER, layer, c, hidden, k, code] for c in n]))
        empty = torch.empty(0, dtype=torch.uint8, device=g.device)
        msgs = [
            pack_rows(parts[w].x, parts[w].expert_ids, parts[w].weights, g.device)
            if w in parts
            else empty
            for w in range(self.num_workers)
        ]
        payload = torch.cat(msgs)  # [bytes]: worker 0's rows, worker 1's, ...
        sizes = [0] + [m.numel() for m in msgs]
        ex.works.append(g.all_to_all(empty, payload, [0] * g.size, sizes, self.timeout_s))
        ex.out = torch.empty(sum(n), hidden, dtype=dtype, device=g.device)  # [sum n, H]
        none = torch.empty(0, hidden, dtype=dtype, device=g.device)
        ex.works.append(g.all_to_all(ex.out, none, [0, *n], [0] * g.size, self.timeout_s))
        ex.done = done_event(ex.works)

    def _send_headers(self, headers: list[list[int]]):
        g = self.group
        flat = torch.tensor(headers, dtype=torch.int64).reshape(-1)  # [N * HEADER]
        nothing = torch.empty(0, dtype=torch.int64)
        sizes = [0] + [HEADER] * self.num_workers
        return g.all_to_all(nothing, flat, [0] * g.size, sizes, self.timeout_s, control=True)

    def _receive(self, pending: Pending) -> dict[int, torch.Tensor]:
        ex: _Exchange = pending.handle
        if ex.error is not None:
            raise WorkerFailure(self._blame(), ex.error)
        if ex.done is not None:
            self._await(ex)
        offsets = [0]
        for c in ex.counts:
            offsets.append(offsets[-1] + c)
        return {w: ex.out[offsets[w] : offsets[w + 1]] for w in pending.parts}

    def _await(self, ex: _Exchange) -> None:
        """Block until the layer's ops finish; WorkerFailure on death, error or deadline."""
        deadline = ex.started + self.timeout_s
        while not ex.done.wait(self.poll_s):
            dead = self._dead()
            if dead:
                self._fail(ex, dead, "worker process died")
            if time.monotonic() > deadline:
                self._fail(ex, self._all(), f"no answer within {self.timeout_s:.0f}s")
        try:
            for work in ex.works:
                work.wait()  # raises the first op's error
        except RuntimeError as e:
            self._fail(ex, self._blame(), str(e))
        ex.works.clear()  # finished ops: nothing holds the group any more

    def _fail_later(self, ex: _Exchange, cause: str) -> None:
        self.broken = ex.error = cause
        self._retire(ex)

    def _fail(self, ex: _Exchange, workers: set[int], cause: str):
        self.broken = cause
        self._retire(ex)
        raise WorkerFailure(workers, cause)

    def _retire(self, ex: _Exchange) -> None:
        """Ops that may never finish go with the group: dropping them here could block."""
        if self.group is not None:
            self.group.retire(ex.works)

    def _dead(self) -> set[int]:
        if self.liveness is None:
            return set()
        try:
            return set(self.liveness())
        except Exception as e:  # a failing health check must not hide the real error
            log.warning("liveness check failed: %s", e)
            return set()

    def _blame(self) -> set[int]:
        """The workers behind an op error: the dead ones, once liveness() sees them; else all.

        A killed worker's sockets close a little before its death is visible (a reaped
        process, a Ray actor marked dead), so ask again for up to `blame_s`.
        """
        deadline = time.monotonic() + self.blame_s
        dead = self._dead()
        while not dead and self.liveness is not None and time.monotonic() < deadline:
            time.sleep(0.02)
            dead = self._dead()
        return dead or self._all()

    def _all(self) -> set[int]:
        return set(range(self.num_workers))

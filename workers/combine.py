"""Exchanges for the same layer that wait on one worker at once are computed as one batch.

With several gateways sharing a worker, their exchanges arrive concurrently (gRPC calls on the
server's threads, or one collective group per gateway, each on its own thread). Computing
them one after another would give the experts each gateway's batch alone; here a call that
finds others of the same layer queued computes them all in one grouped expert FFN, so the
experts see the combined batch of the gateways (the point of M:N). One computation runs at a
time per worker: the shard's torch threads are the worker's compute.

Where the process may use a second core (`fused_moe.helper_thread()`), a computation on the
fused kernel runs on the kernel's helper thread and the calling thread together, splitting the
experts (the same bits whichever thread runs which). At one stream over gRPC the worker that
gets its rows last computes alone while the gateway waits, so a second thread there is
latency saved.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from . import fused_moe
from .experts import ExpertShard
from .stats import ExchangeStats


@dataclass
class _Job:
    layer: int
    x: torch.Tensor  # [n, H]
    ids: torch.Tensor  # [n, k]
    weights: torch.Tensor  # [n, k]
    y: torch.Tensor | None = None  # [n, H] once computed
    error: BaseException | None = None
    done: bool = field(default=False)


class Combiner:
    def __init__(
        self, shard: ExpertShard, stats: ExchangeStats | None = None, overlap: bool | None = None
    ):
        self.shard = shard
        self.stats = stats or ExchangeStats()  # one count per computation, of its rows
        # the kernel's helper thread computes beside the caller (see the module docstring)
        self.overlap = fused_moe.helper_thread() if overlap is None else overlap
        self._queue: list[_Job] = []
        self._queue_lock = threading.Lock()
        self._compute = threading.Lock()

    def forward(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Like `ExpertShard.forward`; may compute other callers' rows of `layer` with these.
        Rows that arrived on the CPU (gRPC, TCP) are moved to the shard's device (a GPU)."""
        job = _Job(layer, *self._on_device(x, ids, weights))
        with self._queue_lock:
            self._queue.append(job)
        with self._compute:
            if not job.done:  # else another caller computed it along with its own
                with self._queue_lock:
                    batch = [j for j in self._queue if j.layer == layer]
                    self._queue = [j for j in self._queue if j.layer != layer]
                self._run(layer, batch)
        if job.error is not None:
            raise job.error
        return job.y

    def compute_together(self, layer: int, parts: list[tuple]) -> list[torch.Tensor]:
        """`compute` for a caller that gathered several exchanges itself (the gRPC server's
        thread): rows that arrived on the CPU are moved to the shard's device first."""
        parts = [self._on_device(*p) for p in parts]
        with self._compute:
            return self.compute(layer, parts)

    def _on_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors on the shard's device (rows arrive on the CPU; the shard may be on a GPU)."""
        dev = self.shard.device
        return tuple(t if t.device == dev else t.to(dev) for t in tensors)

    def compute(self, layer: int, parts: list[tuple]) -> list[torch.Tensor]:
        """Exchanges (x [n, H], ids [n, k], weights [n, k]) of one layer in one computation;
        their results [n, H], in order."""
        started = time.perf_counter()
        if len(parts) == 1:
            out = [self._forward(layer, *parts[0])]
        else:
            x, ids, weights = (torch.cat(t) for t in zip(*parts))  # [sum n, H], [sum n, k] x2
            out = list(self._forward(layer, x, ids, weights).split([len(p[0]) for p in parts]))
        self.stats.add(sum(len(p[0]) for p in parts), len(parts), time.perf_counter() - started)
        return out

    def _forward(self, layer: int, x, ids, weights) -> torch.Tensor:
        if self.overlap:
            return self.shard.start(layer, x, ids, weights).result()  # helper + this thread
        return self.shard.forward(layer, x, ids, weights)

    def _run(self, layer: int, batch: list[_Job]) -> None:
        try:
            ys = self.compute(layer, [(j.x, j.ids, j.weights) for j in batch])
            for j, y in zip(batch, ys, strict=True):
                j.y = y
        except BaseException as e:  # each caller raises it
            for j in batch:
                j.error = e
        finally:
            for j in batch:
                j.done = True

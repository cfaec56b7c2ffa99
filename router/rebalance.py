"""Expert load balancing (as DeepSeek's EPLB), applied while requests run, none paused or lost.

Routing is skewed: a few experts take most tokens, and a layer's exchange waits for the
worker that holds them. Every `period_s` the load since the last look (tokens routed to each
expert, from the engine's counts, summed over the MoE layers: one placement holds in every
layer) gives a `balanced` placement, with up to `redundant` extra copies of the hottest
experts. When it beats the current placement on that load by `min_gain`, the move runs in
three phases:

1. load: each shard also takes the experts the new placement gives it (reading only their
   tensors), in a background thread. Exchanges go on under the old placement meanwhile:
   every shard still holds its old experts.
2. switch: the dispatcher routes by the new placement from the next step on. This runs on
   the engine loop thread between two steps; that thread is the only one that dispatches,
   so no exchange is in flight under the old placement.
3. drop: each shard lets go of the experts it no longer needs (in the background again).

`hold(lists)` does a phase's work: shard s holds exactly lists[s] afterwards (in-process
shards here, `shard_holder`; worker actors through the cluster's link). A load that fails
leaves the old placement in place; a drop that fails leaves spare experts in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.workers.experts import ExpertShard
from expertmesh.workers.placement import ExpertPlacement, balanced

from .dispatch import Dispatcher

log = logging.getLogger(__name__)

Hold = Callable[[list[list[int]]], None]  # shard s holds exactly lists[s] when it returns


def shard_holder(shards: Sequence[ExpertShard], checkpoint: str | Path) -> Hold:
    """`hold` for shards in this process, reading new experts from `checkpoint`."""

    def hold(lists: list[list[int]]) -> None:
        with CheckpointReader(checkpoint) as reader:
            for shard, experts in zip(shards, lists, strict=True):
                shard.hold(reader, experts)

    return hold


@dataclass
class _Move:
    target: ExpertPlacement
    phase: str  # "load", then "drop"
    work: Future  # the phase's hold() in the background
    done: Future = field(default_factory=Future)  # the target, once moved


class Rebalancer:
    def __init__(
        self,
        dispatcher: Dispatcher,
        hold: Hold,
        counts: Callable[[], torch.Tensor],
        period_s: float = 0.0,
        redundant: int = 0,
        min_gain: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ):
        """counts() -> [moe_layers, E] tokens routed to each expert since start (read on the
        engine loop thread); period_s 0: only explicit `move_to`s."""
        shards, experts = dispatcher.placement.num_shards, dispatcher.placement.num_experts
        if not 0 <= redundant <= experts * (shards - 1):
            raise ValueError(
                f"redundant_experts={redundant}: {experts} experts over {shards} workers take "
                f"at most {experts * (shards - 1)} extra copies (one per worker each)"
            )
        self.dispatcher, self.hold, self.counts = dispatcher, hold, counts
        self.period_s, self.redundant, self.min_gain = period_s, redundant, min_gain
        self.clock = clock
        self._seen = counts().clone()  # the counts at the last look
        self._looked = clock()
        self._move: _Move | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expert-move")
        self.moves = 0  # moves completed

    @property
    def busy(self) -> bool:
        """A move is in flight: `tick` has work even while the engine has none."""
        return self._move is not None

    def tick(self) -> None:
        """On the engine loop thread, between two steps: advance the move in flight, or
        look at the load when a period is over and start a move if it pays."""
        if self._move is not None:
            self._advance(self._move)
        elif self.period_s > 0 and self.clock() - self._looked >= self.period_s:
            target = self.propose()
            if target is not None:
                self.move_to(target)

    def propose(self) -> ExpertPlacement | None:
        """The balanced placement for the load since the last look, if it beats the current
        one on that load by `min_gain` (max/mean shard load); else None."""
        counts = self.counts().clone()
        load = (counts - self._seen).sum(0).tolist()  # [E] tokens per expert
        self._seen, self._looked = counts, self.clock()
        if not any(load):
            return None
        now = self.dispatcher.placement
        target = balanced(load, now.num_shards, self.redundant)
        before, after = now.imbalance(load), target.imbalance(load)
        if before < after * (1 + self.min_gain):
            return None
        log.info("moving experts: max/mean shard load %.2f -> %.2f", before, after)
        return target

    def move_to(self, target: ExpertPlacement) -> Future:
        """Start moving to `target` (on the engine loop thread). The future gives the
        target once the experts were dropped, or the error that stopped the move."""
        if self._move is not None:
            raise RuntimeError("an expert move is already in flight")
        now = self.dispatcher.placement
        both = [sorted({*now.experts_of(s), *target.experts_of(s)}) for s in range(now.num_shards)]
        self._move = _Move(target, "load", self._pool.submit(self.hold, both))
        return self._move.done

    def move_now(self, target: ExpertPlacement, timeout_s: float = 600) -> ExpertPlacement:
        """`move_to` and wait, ticking on this thread: for a caller that is the only one
        dispatching (an engine it drives itself, between its calls)."""
        done = self.move_to(target)
        deadline = time.monotonic() + timeout_s
        while not done.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"expert move not done within {timeout_s:.0f}s")
            time.sleep(0.005)
            self.tick()
        return done.result()

    def _advance(self, m: _Move) -> None:
        if not m.work.done():
            return
        error = m.work.exception()
        if m.phase == "load" and error is None:
            try:
                self.dispatcher.set_placement(m.target)  # between two steps: nothing in flight
            except Exception as e:
                error = e
            else:
                keep = [m.target.experts_of(s) for s in range(m.target.num_shards)]
                m.phase, m.work = "drop", self._pool.submit(self.hold, keep)
                return
        self._move = None
        if error is not None:
            log.warning("expert move stopped in its %s phase: %s", m.phase, error)
            m.done.set_exception(error)
        else:
            self.moves += 1
            m.done.set_result(m.target)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

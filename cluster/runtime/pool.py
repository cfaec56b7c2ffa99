"""One pool of expert workers shared by every gateway replica (M gateways : N workers).

Attention grows with traffic; the experts are what is expensive to copy. So the experts are
placed once, by `ExpertPool` (a Serve deployment of one replica whose placement group holds the
workers' bundles), and every gateway replica reaches the same workers: gRPC servers take calls
from any number of gateways, and with the collective transport each gateway has a group of its
own with the workers (a worker serves each group from its own thread). The workers thereby see
the combined batch of all gateways.

A worker's restart is the pool's business, once for all gateways: a gateway that sees a
worker fail asks the pool to wait for a new incarnation (`await_restarts`), naming the pid it
saw fail, so a second gateway reporting the same death does not restart the new process again.
"""

from __future__ import annotations

import asyncio
import logging

from expertmesh.ernie.config import ModelConfig

from ..config import ClusterConfig
from .resources import gpus_per_actor, placement_strategy
from .workerset import Workers, WorkerSet

log = logging.getLogger(__name__)


class ExpertPool:
    """The shared workers, created in the bundles after this replica's own."""

    def __init__(self, cfg: ClusterConfig | dict, gateways: int = 1):
        cfg = ClusterConfig.model_validate(cfg)
        model_cfg = ModelConfig.from_dir(cfg.model)
        self.workers = WorkerSet(
            cfg, cfg.placement(model_cfg), gpus_per_actor(cfg, gateways=gateways)
        )
        self.workers.wait_ready()
        self._lock = asyncio.Lock()
        log.info("expert pool ready: %d workers", len(self.workers.actors))

    def state(self) -> dict:
        """The workers' actor handles and their `ready()` infos, in shard order."""
        return {"actors": list(self.workers.actors), "infos": list(self.workers.infos)}

    async def await_restarts(self, seen_pids: dict[int, int]) -> list[dict]:
        """Wait until each worker in `seen_pids` runs a process other than the one seen
        failing; the infos of all workers after that (raises WorkerUnavailable on timeout)."""
        async with self._lock:  # one recovery at a time; later callers find it done
            await asyncio.to_thread(self.workers.await_restarts, set(seen_pids), seen_pids)
        return list(self.workers.infos)

    async def health(self, timeout_s: float = 0.5) -> dict:
        """The placement strategy Ray used, and each worker: its index, pid, node and whether
        it answered within `timeout_s`."""

        async def probe(i: int, actor) -> dict:
            try:
                info = await asyncio.wait_for(actor.ready.remote(), timeout_s)
                keys = ("pid", "node_id", "exchanges", "batches", "rows")
                return {"index": i, "up": True, **{k: info[k] for k in keys}}
            except Exception:
                return {"index": i, "up": False}

        workers = await asyncio.gather(*(probe(i, a) for i, a in enumerate(self.workers.actors)))
        return {"strategy": placement_strategy(), "workers": list(workers)}


class PooledWorkers(Workers):
    """A gateway's view of the shared pool: the `Workers` a link needs, restarts via the pool.

    `pool` is a handle to the `ExpertPool` deployment; its calls block (the gateway calls them
    from its constructor thread and its engine thread, never from its event loop)."""

    def __init__(self, pool):
        self.pool = pool
        self.actors, self.infos, self._loops = [], [], []

    def wait_ready(self) -> list[dict]:
        state = self.pool.state.remote().result()
        self.actors, self.infos = state["actors"], state["infos"]
        return self.infos

    def await_restarts(self, workers: set[int]) -> None:
        seen = {w: self.infos[w]["pid"] for w in workers}
        self.infos = self.pool.await_restarts.remote(seen).result()

    def shutdown(self) -> None:
        pass  # the pool's workers outlive any one gateway

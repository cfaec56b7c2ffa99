"""The gateway's expert workers as Ray actors: creating them, and waiting for them to come back.

Workers are placed in the bundles after the gateway's own in the current placement group.
Recovery: a transport reports a `WorkerFailure`; the link asks us to wait for Ray to restart the
actors (killing one first if it is alive but hung), then reconnects, and the dispatcher
re-sends the lost exchange. Which transport the workers serve is the link's business.
"""

from __future__ import annotations

import logging
import time

import ray
from expertmesh.router.dispatch import WorkerUnavailable
from expertmesh.workers.actor import ExpertWorker
from expertmesh.workers.placement import ExpertPlacement
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import ClusterConfig

log = logging.getLogger(__name__)


class Workers:
    """What a gateway's link needs of its expert workers, whoever owns them: their actors and
    `ready()` infos, their collective loops, and waiting for restarted ones."""

    actors: list
    infos: list[dict]
    _loops: list  # collective: each worker's long-running serve call for this gateway

    def wait_ready(self) -> list[dict]:
        raise NotImplementedError

    def await_restarts(self, workers: set[int]) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass

    # -- collective loops ---------------------------------------------------------------------

    def start_loops(self, host: str, port: int, backend: str) -> None:
        """Have every worker join the collective group hosted at host:port (a long-running call)."""
        world = len(self.actors) + 1
        self._loops = [
            a.run_collective.remote(host, port, i + 1, world, backend)
            for i, a in enumerate(self.actors)
        ]

    def dead_loops(self) -> set[int]:
        """Workers whose collective loop failed: a death shows here at once. A loop that
        returned (the group broke under it) belongs to a survivor, not a dead worker."""
        done, _ = ray.wait(self._loops, num_returns=len(self._loops), timeout=0)
        dead = set()
        for ref in done:
            try:
                ray.get(ref, timeout=0)
            except Exception:
                dead.add(self._loops.index(ref))
        return dead


class WorkerSet(Workers):
    """Expert workers created here, in the bundles after the first of the current placement
    group: a gateway's own (one gateway), or the shared pool's (`pool.ExpertPool`)."""

    probe_s = 3.0  # a worker that cannot answer ready() this fast during recovery counts as hung

    def __init__(self, cfg: ClusterConfig, placement: ExpertPlacement, gpus_per_worker: float = 0):
        self.cfg, self.placement = cfg, placement
        self.gpus_per_worker = gpus_per_worker
        self.pg = ray.util.get_current_placement_group()
        self.actors = [self._create(i) for i in range(placement.num_shards)]
        self.infos: list[dict] = []
        self._loops: list = []

    def _create(self, i: int):
        opts = dict(
            num_cpus=self.cfg.worker_cpus,
            num_gpus=self.gpus_per_worker,
            max_restarts=self.cfg.max_worker_restarts,
            max_task_retries=0,
            max_concurrency=64,  # ready() answers while each gateway's collective loop runs
            name=None,
            runtime_env=self.cfg.runtime_env(),
        )
        if self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=i + 1
            )
        actor_cls = ray.remote(ExpertWorker)
        return actor_cls.options(**opts).remote(
            self.cfg.model,
            i,
            self.placement.experts_of(i),
            self.cfg.dtype,
            self.cfg.transport,
            self.cfg.torch_threads,
        )

    def wait_ready(self) -> list[dict]:
        """Block until every worker has loaded its shard (they load in parallel)."""
        self.infos = ray.get(
            [a.ready.remote() for a in self.actors], timeout=self.cfg.restart_timeout_s * 5
        )
        for info in self.infos:
            log.info("worker %(index)d up: pid %(pid)d, %(nbytes)d bytes, %(address)s", info)
        return self.infos

    # -- recovery ---------------------------------------------------------------------------

    def await_restarts(self, workers: set[int], seen_pids: dict[int, int] | None = None) -> None:
        """Block until each of `workers` is a new incarnation, or raise WorkerUnavailable.

        seen_pids: the pid each caller saw fail; a worker already past that incarnation (another
        gateway of the pool waited for its restart first) is not restarted again."""
        deadline = time.monotonic() + self.cfg.restart_timeout_s
        for w in sorted(workers):
            seen = (seen_pids or {}).get(w, self.infos[w]["pid"])
            if seen == self.infos[w]["pid"]:
                self._await_restart(w, deadline)

    def _await_restart(self, w: int, deadline: float) -> None:
        """Wait for a new incarnation of worker w. One that is still alive (it answers with its
        old pid) or hung (it does not answer at all) is killed once, so that Ray restarts it."""
        old_pid, killed = self.infos[w]["pid"], False
        while (left := deadline - time.monotonic()) > 0:
            try:
                info = ray.get(self.actors[w].ready.remote(), timeout=min(left, self.probe_s))
            except RayActorError as e:  # dead, or restarting: Ray will bring it back
                log.info("worker %d not back yet: %s", w, type(e).__name__)
                time.sleep(0.1)
                continue
            except GetTimeoutError:
                info = None  # hung, or still loading its shard after a restart
            if info is not None and info["pid"] != old_pid:
                self.infos[w] = info
                return
            if not killed:
                log.warning(
                    "worker %d (pid %d) is alive but failed or hung; restarting it", w, old_pid
                )
                ray.kill(self.actors[w], no_restart=False)
                killed = True
            time.sleep(0.2)
        raise WorkerUnavailable(
            f"expert worker {w} did not come back within {self.cfg.restart_timeout_s:.0f}s"
        )

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)

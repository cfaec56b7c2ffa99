"""The gateway's expert workers: creating them, reaching them, and bringing them back.

Workers are Ray actors placed in the bundles after the gateway's own in the current placement
group. Recovery: a transport reports a `WorkerFailure`; we wait for Ray to restart the actor
(killing it first if it is alive but hung), then reconnect the transport, and the dispatcher
re-sends the lost exchange.
"""

from __future__ import annotations

import logging
import socket
import time

import ray
from expertmesh.router.dispatch import Dispatcher, WorkerFailure, WorkerUnavailable
from expertmesh.workers.actor import ExpertWorker
from expertmesh.workers.placement import ExpertPlacement
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import ClusterConfig

log = logging.getLogger(__name__)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class WorkerSet:
    probe_s = 3.0  # a worker that cannot answer ready() this fast during recovery counts as hung

    def __init__(self, cfg: ClusterConfig, placement: ExpertPlacement, gpus_per_worker: float = 0):
        self.cfg, self.placement = cfg, placement
        self.gpus_per_worker = gpus_per_worker
        self.pg = ray.util.get_current_placement_group()
        self.actors = [self._create(i) for i in range(placement.num_shards)]
        self.infos: list[dict] = []
        self.dispatcher: Dispatcher | None = None
        self._loops: list = []  # collective: each worker's long-running serve call

    def _create(self, i: int):
        opts = dict(
            num_cpus=self.cfg.worker_cpus,
            num_gpus=self.gpus_per_worker,
            max_restarts=self.cfg.max_worker_restarts,
            max_task_retries=0,
            max_concurrency=4,  # ready() answers while a collective loop runs
            name=None,
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

    # -- transports -------------------------------------------------------------------------

    def make_dispatcher(self, gateway_host: str) -> Dispatcher:
        if self.cfg.transport == "grpc":
            from expertmesh.router.grpc_dispatch import GrpcDispatcher

            d = GrpcDispatcher(
                self.placement, [i["address"] for i in self.infos], self.cfg.rpc_timeout_s
            )
        else:
            from expertmesh.router.collective_dispatch import CollectiveDispatcher
            from expertmesh.workers.collective import pick_backend

            self._gateway_host = gateway_host
            self._backend = pick_backend(self._device_spread())
            port = free_port(gateway_host)
            d = CollectiveDispatcher(
                self.placement,
                gateway_host,
                port,
                len(self.actors) + 1,
                backend=self._backend,
                timeout_s=self.cfg.rpc_timeout_s,
                liveness=self.dead_workers,
            )
            self._start_loops(port)
            d.connect()
        d.recover = self.recover
        self.dispatcher = d
        return d

    def _device_spread(self) -> str:
        """'cuda' only when every rank has a GPU of its own (NCCL needs one per rank)."""
        return "cuda" if self.gpus_per_worker >= 1 else "cpu"

    def _start_loops(self, port: int) -> None:
        world = len(self.actors) + 1
        self._loops = [
            a.run_collective.remote(self._gateway_host, port, i + 1, world, self._backend)
            for i, a in enumerate(self.actors)
        ]

    def dead_workers(self) -> set[int]:
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

    # -- recovery ---------------------------------------------------------------------------

    def recover(self, failure: WorkerFailure) -> None:
        deadline = time.monotonic() + self.cfg.restart_timeout_s
        log.warning("recovering from %s", failure)
        for w in sorted(failure.workers):
            self._await_restart(w, deadline)
        if self.cfg.transport == "grpc":
            for w in failure.workers:
                self.dispatcher.reconnect(w, self.infos[w]["address"])
        else:
            port = free_port(self._gateway_host)
            self._start_loops(port)
            self.dispatcher.rebuild(port)
        log.warning("workers %s are back", sorted(failure.workers))

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
        if self.dispatcher is not None:
            try:
                self.dispatcher.close()
            except Exception:
                log.exception("closing the dispatcher failed")
        for a in self.actors:
            ray.kill(a, no_restart=True)

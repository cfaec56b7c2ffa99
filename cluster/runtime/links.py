"""How a gateway reaches its expert workers: one lifecycle object per transport.

A link connects (builds the transport's `Dispatcher` once the workers are up), reconnects
after workers were restarted (a new gRPC channel or TCP connection to the new address; a new collective group
over all ranks, since gloo and NCCL cannot replace a rank) and closes. The gateway and the
worker set never ask which transport they have: they ask the link.

Load balancing moves experts between workers (`hold`, run by the gateway's `Rebalancer`); a
worker restarted by Ray comes back with the experts it was created with, so after a restart,
and when it connects, the link gives each worker the experts of the dispatcher's placement.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import ray
import torch
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.router.dispatch import Dispatcher, LocalDispatcher, WorkerFailure
from expertmesh.router.rebalance import shard_holder
from expertmesh.workers.experts import ExpertShard
from expertmesh.workers.placement import ExpertPlacement

from ..config import ClusterConfig
from .resources import free_port
from .workerset import Workers, WorkerSet

log = logging.getLogger(__name__)


class Link(ABC):
    """One gateway's connection to its experts."""

    def __init__(
        self,
        cfg: ClusterConfig,
        placement: ExpertPlacement,
        gpus_per_worker: float,
        workers: Workers | None = None,
    ):
        self.cfg, self.placement = cfg, placement
        self.gpus_per_worker = gpus_per_worker
        self.workers: Workers | None = workers  # given: a pool shared with other gateways
        self.dispatcher: Dispatcher | None = None

    def start(self) -> None:
        """Create the workers, unless a shared pool was given; they load their shards while
        the gateway loads its own weights."""
        if self.workers is None:
            self.workers = WorkerSet(self.cfg, self.placement, self.gpus_per_worker)

    def connect(self, model_cfg: ModelConfig, dtype: torch.dtype, device: str) -> Dispatcher:
        """Wait for the workers, then the dispatcher that reaches them (recovering on failure)."""
        self.workers.wait_ready()
        self._give_experts(set(range(len(self.workers.actors))))  # a pool that moved them
        self.dispatcher = self._dispatcher()
        self.dispatcher.recover = self.recover
        return self.dispatcher

    def recover(self, failure: WorkerFailure) -> None:
        """Wait until the failed workers are back (Ray restarts them), then reconnect."""
        log.warning("recovering from %s", failure)
        self.workers.await_restarts(failure.workers)
        self._give_experts(failure.workers)
        self._reconnect(failure.workers)
        log.warning("workers %s are back", sorted(failure.workers))

    def hold(self, lists: list[list[int]]) -> None:
        """Worker w holds exactly lists[w] when this returns (a phase of an expert move)."""
        refs = [a.hold_experts.remote(e) for a, e in zip(self.workers.actors, lists, strict=True)]
        for w, info in enumerate(ray.get(refs, timeout=self.cfg.restart_timeout_s)):
            self.workers.infos[w] = info

    def _give_experts(self, workers: set[int]) -> None:
        """Have each of `workers` hold its experts of the current placement, if it does not."""
        placement = self.dispatcher.placement if self.dispatcher else self.placement
        for w in sorted(workers):
            want = placement.experts_of(w)
            if sorted(self.workers.infos[w]["experts"]) != want:
                log.info("worker %d: giving it experts %s", w, want)
                ref = self.workers.actors[w].hold_experts.remote(want)
                self.workers.infos[w] = ray.get(ref, timeout=self.cfg.restart_timeout_s)

    def close(self) -> None:
        if self.dispatcher is not None:
            try:
                self.dispatcher.close()
            except Exception:
                log.exception("closing the dispatcher failed")
        if self.workers is not None:
            self.workers.shutdown()

    @abstractmethod
    def _dispatcher(self) -> Dispatcher: ...

    @abstractmethod
    def _reconnect(self, workers: set[int]) -> None: ...


class LocalLink(Link):
    """Every shard in the gateway's process: no workers to start, nothing to reconnect."""

    def start(self) -> None:
        pass

    def connect(self, model_cfg: ModelConfig, dtype: torch.dtype, device: str) -> Dispatcher:
        with CheckpointReader(self.cfg.model) as reader:
            shards = [
                ExpertShard.load(reader, model_cfg, self.placement.experts_of(s), dtype, device)
                for s in range(self.placement.num_shards)
            ]
        self.dispatcher = LocalDispatcher(self.placement, shards)
        return self.dispatcher

    def hold(self, lists: list[list[int]]) -> None:
        shard_holder(self.dispatcher.shards, self.cfg.model)(lists)

    def _dispatcher(self) -> Dispatcher:
        raise AssertionError("LocalLink builds its dispatcher in connect()")

    def _reconnect(self, workers: set[int]) -> None:
        raise AssertionError("in-process shards do not fail apart from the gateway")


class GrpcLink(Link):
    """One gRPC channel per worker; a restarted worker gets a new channel to its new port."""

    def _dispatcher(self) -> Dispatcher:
        from expertmesh.router.grpc_dispatch import GrpcDispatcher

        addresses = [info["address"] for info in self.workers.infos]
        return GrpcDispatcher(self.placement, addresses, self.cfg.rpc_timeout_s)

    def _reconnect(self, workers: set[int]) -> None:
        for w in workers:
            self.dispatcher.reconnect(w, self.workers.infos[w]["address"])


class TcpLink(GrpcLink):
    """One TCP connection per worker, made on first use; a restarted worker's new address
    replaces the old one (the failed connection is already closed)."""

    def _dispatcher(self) -> Dispatcher:
        from expertmesh.router.tcp_dispatch import TcpDispatcher

        addresses = [info["address"] for info in self.workers.infos]
        return TcpDispatcher(self.placement, addresses, self.cfg.rpc_timeout_s)


class CollectiveLink(Link):
    """A torch.distributed group over the gateway (rank 0) and the workers; every failure
    means a new group, which the workers join from a fresh long-running call."""

    def _dispatcher(self) -> Dispatcher:
        from expertmesh.router.collective_dispatch import CollectiveDispatcher
        from expertmesh.workers.collective import pick_backend

        self._host = ray.util.get_node_ip_address()
        # NCCL only when every rank has a GPU of its own
        self._backend = pick_backend("cuda" if self.gpus_per_worker >= 1 else "cpu")
        port = free_port(self._host)
        d = CollectiveDispatcher(
            self.placement,
            self._host,
            port,
            self.placement.num_shards + 1,
            backend=self._backend,
            timeout_s=self.cfg.rpc_timeout_s,
            liveness=self.workers.dead_loops,
        )
        self.workers.start_loops(self._host, port, self._backend)
        d.connect()
        return d

    def _reconnect(self, workers: set[int]) -> None:
        port = free_port(self._host)
        self.workers.start_loops(self._host, port, self._backend)
        self.dispatcher.rebuild(port)


LINKS: dict[str, type[Link]] = {
    "local": LocalLink,
    "grpc": GrpcLink,
    "tcp": TcpLink,
    "collective": CollectiveLink,
}


def make_link(
    cfg: ClusterConfig,
    placement: ExpertPlacement,
    gpus_per_worker: float,
    workers: Workers | None = None,
) -> Link:
    return LINKS[cfg.transport](cfg, placement, gpus_per_worker, workers)

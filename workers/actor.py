"""The expert worker: a Ray actor holding one shard of experts and the transport it serves.

It is stateless besides its weights: when its process dies, Ray restarts it (`max_restarts`),
the new process reloads its shard and reports its new address through `ready()`. The
experts it holds may change while it serves (`hold_experts`, for load balancing); a restart
brings back the ones it was created with, and the gateway's link gives it its current ones.
"""

from __future__ import annotations

import logging
import os

import ray
import torch
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.devices import compute_dtype, resolve_device

from .combine import Combiner
from .experts import ExpertShard

log = logging.getLogger(__name__)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _serve_grpc(worker: ExpertWorker) -> None:
    from .grpc_server import start_expert_server

    worker.server, port = start_expert_server(
        worker.shard, worker.index, host=worker.host, combiner=worker.combiner
    )
    worker.address = f"{worker.host}:{port}"


def _serve_tcp(worker: ExpertWorker) -> None:
    from .tcp_server import ExpertTcpServer

    worker.server = ExpertTcpServer(
        worker.shard, worker.index, host=worker.host, combiner=worker.combiner
    )
    worker.address = f"{worker.host}:{worker.server.port}"


def _serve_collective(worker: ExpertWorker) -> None:
    pass  # each gateway's group is joined by its own run_collective() call


# how a worker is reached, per transport: started once its shard is loaded
SERVERS = {"grpc": _serve_grpc, "tcp": _serve_tcp, "collective": _serve_collective}


class ExpertWorker:
    def __init__(
        self,
        model: str,
        index: int,
        experts: list[int],
        dtype: str,
        transport: str,
        torch_threads: int = 1,
    ):
        torch.set_num_threads(torch_threads)
        self.index, self.model = index, model
        self.rss_before_load = rss_bytes()
        self.device = resolve_device("auto", gpu_assigned=bool(ray.get_gpu_ids()))
        cfg = ModelConfig.from_dir(model)
        torch_dtype = compute_dtype(dtype, self.device, cfg.dtype)
        with CheckpointReader(model) as reader:
            self.shard = ExpertShard.load(
                reader, cfg, experts, torch_dtype, self.device, progress=f"worker {index}"
            )
            self.bytes_read = reader.bytes_read
        # every exchange, from any gateway, computes through it (and is counted there)
        self.combiner = Combiner(self.shard)
        self.host = ray.util.get_node_ip_address()
        self.address: str | None = None  # grpc, tcp: where its server listens
        # collective: one group per gateway (M gateways share this worker), by master address
        self.groups: dict[str, object] = {}
        SERVERS[transport](self)
        log.info(
            "worker %d ready: %d experts, %d bytes, %s",
            index,
            len(experts),
            self.shard.nbytes,
            self.address,
        )

    def ready(self) -> dict:
        """Who and where this incarnation is; answers once the shard is loaded."""
        return {
            "index": self.index,
            "pid": os.getpid(),
            "address": self.address,
            "host": self.host,
            "node_id": ray.get_runtime_context().get_node_id(),
            "experts": self.shard.experts,
            "nbytes": self.shard.nbytes,
            "bytes_read": self.bytes_read,
            "rss_before_load": self.rss_before_load,
            "rss": rss_bytes(),
            **self.combiner.stats.snapshot(),  # exchanges served, computations, rows
        }

    def hold_experts(self, experts: list[int]) -> dict:
        """Hold exactly `experts` from now on, reading only the tensors of those it lacks,
        while it goes on serving; `ready()`'s info after that."""
        with CheckpointReader(self.model) as reader:
            self.shard.hold(reader, experts)
            self.bytes_read += reader.bytes_read
        return self.ready()

    def run_collective(
        self, master_addr: str, master_port: int, rank: int, world: int, backend: str
    ) -> str:
        """Join a gateway's process group and serve its exchanges until shutdown or breakage.

        A long-running call: its result fails as soon as this process dies, which is how the
        gateway learns of a death without waiting for a socket timeout. Each gateway sharing
        this worker has its own group and its own such call (a thread of this actor).
        """
        from .collective import CollectiveWorker

        key = f"{master_addr}:{master_port}"
        worker = self.groups[key] = CollectiveWorker(self.shard, self.combiner)
        try:
            worker.join(master_addr, master_port, rank, world, backend=backend)
            return worker.serve()
        finally:
            self.groups.pop(key, None)

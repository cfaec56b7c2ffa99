"""What a gateway and its workers ask of the cluster: GPUs per actor, placement bundles, ports."""

from __future__ import annotations

import socket

import ray

from ..config import ClusterConfig


def gpus_per_actor(cfg: ClusterConfig) -> float:
    """One GPU per actor when there are enough; else they share (NCCL then falls back to gloo)."""
    total = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if cfg.device == "cpu" or total == 0:
        return 0
    actors = cfg.workers + 1
    return 1 if total >= actors else int(100 * total / actors) / 100


def bundles(cfg: ClusterConfig) -> list[dict]:
    """The gateway's bundle first, then one per expert worker (none when they are in-process)."""
    gpus = gpus_per_actor(cfg)
    gateway = {"CPU": cfg.gateway_cpus, **({"GPU": gpus} if gpus else {})}
    if cfg.in_process:
        return [gateway]
    worker = {"CPU": cfg.worker_cpus, **({"GPU": gpus} if gpus else {})}
    return [gateway] + [dict(worker) for _ in range(cfg.workers)]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

"""What a gateway and its workers ask of the cluster: GPUs per actor, placement bundles, ports."""

from __future__ import annotations

import socket

import ray

from ..config import ClusterConfig


def gpus_per_actor(cfg: ClusterConfig, gateways: int = 1) -> float:
    """One GPU per actor when there are enough; else they share (NCCL then falls back to gloo).
    gateways: the gateway replicas that share the workers (at most, when they autoscale)."""
    total = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if cfg.device == "cpu" or total == 0:
        return 0
    actors = cfg.workers + gateways
    return 1 if total >= actors else int(100 * total / actors) / 100


def bundles(cfg: ClusterConfig, gateways: int = 1) -> list[dict]:
    """The gateway's bundle first, then one per expert worker (none when they are in-process)."""
    gpus = gpus_per_actor(cfg, gateways)
    gateway = {"CPU": cfg.gateway_cpus, **({"GPU": gpus} if gpus else {})}
    if cfg.in_process:
        return [gateway]
    worker = {"CPU": cfg.worker_cpus, **({"GPU": gpus} if gpus else {})}
    return [gateway] + [dict(worker) for _ in range(cfg.workers)]


def pool_bundles(cfg: ClusterConfig, gateways: int) -> list[dict]:
    """The shared pool's placement group: a token bundle for the pool replica itself, then one
    per expert worker; the gateways are placed on their own, each with `bundles(...)[0]`."""
    return [{"CPU": 0.01}] + bundles(cfg, gateways)[1:]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def placement_strategy() -> str | None:
    """The strategy of the placement group this process was placed in, if any."""
    pg = ray.util.get_current_placement_group()
    if pg is None:
        return None
    return ray.util.placement_group_table(pg).get("strategy")

"""Starting Ray and a gateway with its workers from a driver (the CLI, tests, benchmarks)."""

from __future__ import annotations

import logging
import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import ClusterConfig
from .gateway import Gateway
from .resources import bundles

log = logging.getLogger(__name__)


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address`, or start a local Ray kept on 127.0.0.1 (no dashboard)."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A local instance needs no external address. Ray takes 127.0.0.1 only when
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set before `import ray` (the CLI and the tests
    # do that); setting it here covers the processes Ray spawns.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        address="local",  # a new instance, even if another Ray runs on this machine
        num_cpus=num_cpus or max(8, 2 * (os.cpu_count() or 1)),
        include_dashboard=False,
        log_to_driver=True,
    )


class GatewayHandle:
    """A gateway actor and the placement group it and its workers live in."""

    def __init__(self, cfg: ClusterConfig, timeout_s: float = 600):
        self.cfg = cfg
        self.pg = placement_group(bundles(cfg), strategy=cfg.strategy)
        ray.get(self.pg.ready(), timeout=timeout_s)
        actor_cls = ray.remote(Gateway)
        self.actor = actor_cls.options(
            num_cpus=cfg.gateway_cpus,
            num_gpus=bundles(cfg)[0].get("GPU", 0),
            max_concurrency=1000,
            runtime_env=cfg.runtime_env(),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=0
            ),
        ).remote(cfg.model_dump())
        ray.get(self.actor.stats.remote(), timeout=timeout_s)  # waits for construction

    def generate_all(self, prompts: list[list[int]], params: list, images=None) -> list[list]:
        return ray.get(self.actor.generate_all.remote(prompts, params, images))

    def shutdown(self) -> None:
        try:
            ray.get(self.actor.shutdown.remote(), timeout=60)
        except Exception:
            log.exception("gateway shutdown failed")
        ray.kill(self.actor)
        remove_placement_group(self.pg)

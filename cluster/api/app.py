"""The Ray Serve application: an OpenAI-compatible FastAPI ingress over gateways and experts.

Three tiers, each its own deployment:
- the ingress (CPU, autoscaled) tokenizes, applies the chat template, validates and shapes
  responses, and spreads requests over the gateways (`multiplex.GatewayMux`);
- the gateways (`--gateways N`, or `auto`: Serve scales them on ongoing requests) each run
  attention, the router and a KV cache;
- one pool of expert workers (`ExpertPool`), placed once in its placement group and shared by
  every gateway replica. With `--transport local` there is no pool: each gateway holds all
  experts itself.

`build_app(args)` serves `serve run` and Serve config files alike; its `args` are `ServeArgs`,
and an unknown key is an error that names it.
"""

from __future__ import annotations

import dataclasses

from ray import serve
from ray.serve.config import RequestRouterConfig

from ..config import ServeArgs
from ..runtime.gateway import ServedGateway
from ..runtime.pool import ExpertPool
from ..runtime.resources import bundles, pool_bundles
from .ratelimit import RateLimiter, load_keys
from .routing import GatewayRouter

GRACE_S = 2.0  # how long Serve waits for a replica's ongoing requests when it stops


def gateway_count(args: ServeArgs) -> int:
    """Gateway replicas at most (what the GPUs are divided by)."""
    return args.max_gateways if args.gateways == "auto" else int(args.gateways)


def gateway_deployment(args: ServeArgs) -> serve.Deployment:
    cfg = args.cluster_config()
    n = gateway_count(args)
    first = bundles(cfg, n)[0]
    scaling = (
        dict(
            autoscaling_config={
                "min_replicas": args.min_gateways,
                "max_replicas": args.max_gateways,
                "target_ongoing_requests": args.target_gateway_requests,
                "upscale_delay_s": 2,
                "downscale_delay_s": 10,
                "metrics_interval_s": 1,
                "look_back_period_s": 4,
            }
        )
        if args.gateways == "auto"
        else dict(num_replicas=n)
    )
    options = dict(
        name="Gateway",
        max_ongoing_requests=100_000,  # every request counts; the engine queues and batches
        ray_actor_options={
            "num_cpus": first.get("CPU", 1),
            "num_gpus": first.get("GPU", 0),
            "runtime_env": cfg.runtime_env(),
        },
        health_check_period_s=2,
        health_check_timeout_s=10,
        graceful_shutdown_timeout_s=GRACE_S,  # the server drains the gateway before it stops
        request_router_config=RequestRouterConfig(request_router_class=GatewayRouter),
        **scaling,
    )
    if cfg.in_process:  # the gateway holds every expert: its placement group is its own
        options.update(
            placement_group_bundles=bundles(cfg, n), placement_group_strategy=cfg.strategy
        )
    return serve.deployment(ServedGateway, **options)


def pool_deployment(args: ServeArgs) -> serve.Deployment:
    """The expert workers, placed once (by the pool replica's placement group) for all gateways."""
    cfg = args.cluster_config()
    return serve.deployment(
        ExpertPool,
        name="Experts",
        num_replicas=1,
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0.01},
        placement_group_bundles=pool_bundles(cfg, gateway_count(args)),
        placement_group_strategy=cfg.strategy,
        graceful_shutdown_timeout_s=GRACE_S,
    )


def build_app(args: dict | ServeArgs) -> serve.Application:
    from .ingress import Ingress

    args = ServeArgs.model_validate(args)
    path, name = args.resolve_model()
    cfg = args.cluster_config(path).model_dump()
    n = gateway_count(args)
    pool = None if args.cluster_config().in_process else pool_deployment(args).bind(cfg, n)
    gateway = gateway_deployment(args).bind(cfg, pool, n)
    limits = {
        k: dataclasses.asdict(v) for k, v in load_keys(args.api_keys, args.api_keys_file).items()
    }
    limiter = serve.deployment(
        RateLimiter, name="RateLimiter", num_replicas=1, ray_actor_options={"num_cpus": 0}
    ).bind(limits)
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        graceful_shutdown_timeout_s=GRACE_S,
        autoscaling_config={
            "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        },
        ray_actor_options={"num_cpus": 0.5},
    )
    return ingress.bind(gateway, pool, limiter, args.model_dump(), path, name)

"""The Ray Serve application: an OpenAI-compatible FastAPI ingress over a gateway deployment.

The ingress (CPU, autoscaled) tokenizes, applies the chat template, validates and shapes
responses; the gateway deployment (one replica per model copy) owns the engine and creates its
expert workers in the bundles of its placement group, so a replica and its workers are placed
and released together. `build_app(args)` serves `serve run` and Serve config files alike; its
`args` are `ServeArgs`, and an unknown key is an error that names it.
"""

from __future__ import annotations

import dataclasses

from ray import serve

from ..config import ServeArgs
from ..runtime.gateway import Gateway
from ..runtime.resources import bundles
from .ratelimit import RateLimiter, load_keys

GRACE_S = 2.0  # how long Serve waits for a replica's ongoing requests when it stops


def gateway_deployment(args: ServeArgs) -> serve.Deployment:
    cfg = args.cluster_config()
    first = bundles(cfg)[0]
    return serve.deployment(
        Gateway,
        name="Gateway",
        num_replicas=1,
        max_ongoing_requests=100_000,  # every stream counts; the engine queues and batches
        ray_actor_options={"num_cpus": first.get("CPU", 1), "num_gpus": first.get("GPU", 0)},
        placement_group_bundles=bundles(cfg),
        placement_group_strategy=cfg.strategy,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=GRACE_S,  # the server drains the gateway before it stops
    )


def build_app(args: dict | ServeArgs) -> serve.Application:
    from .ingress import Ingress

    args = ServeArgs.model_validate(args)
    path, name = args.resolve_model()
    gateway = gateway_deployment(args).bind(args.cluster_config(path).model_dump())
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
    return ingress.bind(gateway, limiter, args.model_dump(), path, name)

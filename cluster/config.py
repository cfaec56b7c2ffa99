"""The one config chain: `ClusterConfig` (a gateway and its expert workers) and `ServeArgs`.

`ClusterConfig` owns every engine and placement field, once. `ServeArgs` is a `ClusterConfig`
plus the fields of the HTTP edge, so each of those fields is a `serve` flag, a key of a Serve
config's `args` and of a RayService's `serveConfigV2`; the engine config is derived from it.
Unknown keys are refused by name (`extra="forbid"`), never silently dropped.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

from expertmesh.ernie.config import ModelConfig
from expertmesh.router.engine import EngineConfig
from expertmesh.workers.placement import ExpertPlacement
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

# how a gateway reaches its expert workers: gRPC streams, plain TCP frames (the same exchanges
# without gRPC's per-message thread hops), a torch.distributed all-to-all, or in-process shards
Transport = Literal["grpc", "tcp", "collective", "local"]


# gRPC's I/O on the thread that waits for it (the completion queue's poller) instead of on
# its event-engine threads: one hop between threads less per message each way. An exchange
# with two workers took 753-761 us instead of 805-815 us, 1130 us of CPU instead of 1285
# (`scripts/bench_transport_overhead.py`, alternating); grpcio reads it once, when it is
# imported, so it is set in the environment the gateway and worker processes start with.
GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"


class ClusterConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="checkpoint directory in the Hugging Face Hub layout")
    workers: int = Field(2, ge=1, description="expert workers (one shard of experts each)")
    expert_map: list[int] | None = Field(
        None, description="owner worker of each expert; default: contiguous blocks"
    )
    transport: Transport = Field(
        "grpc", description="how the gateway reaches the workers; local keeps shards in-process"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto: float32 on CPU, the checkpoint's on GPU"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="cuda when GPUs are in the cluster, else cpu"
    )
    strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="placement-group strategy for the gateway and workers over nodes"
    )
    gateway_cpus: float = Field(1, gt=0, description="CPUs reserved for the gateway")
    worker_cpus: float = Field(1, gt=0, description="CPUs reserved for each expert worker")
    torch_threads: int = Field(1, ge=1, description="torch threads in each worker process")
    gateway_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads in the gateway process; default: the cores it may use less "
        "one (left to the HTTP side and Ray), divided among the engines that share them",
    )
    max_num_seqs: int = Field(64, ge=1, description="sequences in one batch at most")
    max_tokens_per_step: int = Field(2048, ge=1, description="tokens through the model per step")
    kv_cache_tokens: int = Field(65536, ge=16, description="KV-cache budget in tokens")
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    max_model_len: int | None = Field(None, description="prompt + output limit per request")
    max_waiting: int = Field(
        1024, ge=0, description="queued requests beyond which new ones get 429"
    )
    rpc_timeout_s: float = Field(
        30, gt=0, description="an exchange slower than this counts as a hung worker"
    )
    restart_timeout_s: float = Field(
        60, gt=0, description="how long to wait for a failed worker to come back"
    )
    max_worker_restarts: int = Field(20, ge=0, description="Ray restarts of each worker actor")
    grpc_experiments: str = Field(
        GRPC_EXPERIMENTS,
        description="GRPC_EXPERIMENTS of the gateway and worker processes with --transport grpc "
        "(default: socket I/O on the thread that waits for it, not on gRPC's event-engine "
        "threads); it applies to Ray's own gRPC in those processes too; empty: gRPC's "
        "defaults; a GRPC_EXPERIMENTS already in the environment wins",
    )
    rebalance_period_s: float = Field(
        0,
        ge=0,
        description="expert load balancing: every this many seconds, place the experts for "
        "the load since the last look, moving them live if that balances the workers better; "
        "0: never",
    )
    redundant_experts: int = Field(
        0,
        ge=0,
        description="extra copies of hot experts over all workers when balancing (each worker "
        "then holds up to (experts + this) / workers experts)",
    )

    def runtime_env(self) -> dict:
        """The Ray runtime env of the gateway and worker actors: `grpc_experiments` where the
        transport is gRPC and the environment sets none."""
        if (
            self.transport != "grpc"
            or not self.grpc_experiments
            or "GRPC_EXPERIMENTS" in os.environ
        ):
            return {}
        return {"env_vars": {"GRPC_EXPERIMENTS": self.grpc_experiments}}

    @property
    def in_process(self) -> bool:
        """Whether the experts live in the gateway's process (no worker actors)."""
        return self.transport == "local"

    def gateway_torch_threads(self, gateways: int = 1, cores: int | None = None) -> int:
        """`gateway_threads`, else: the cores this process may use (`cores`) less one, divided
        among the engines that share them (the gateways, and the workers unless in-process).

        Why not all of them: a decode step is a chain of short OpenMP regions, and a thread of
        one that another process preempts (the HTTP proxy, the ingress, Ray's own processes)
        stalls the whole region at its barrier. On 2 cores, 2 gateway threads gave an HTTP
        inter-token latency of ~25 ms at one stream where 1 thread gave ~15 ms."""
        if self.gateway_threads is not None:
            return self.gateway_threads
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
        engines = max(1, gateways) + (0 if self.in_process else self.workers)
        return max(1, (cores - 1) // engines)

    def placement(self, model_cfg: ModelConfig) -> ExpertPlacement:
        """Which worker owns each expert: `expert_map`, else contiguous blocks (VL: of the text
        experts and of the vision experts each, so that every worker serves both)."""
        if self.expert_map:
            return ExpertPlacement.from_map(self.expert_map, model_cfg.num_experts)
        groups = 2 if model_cfg.is_vl else 1
        return ExpertPlacement.contiguous(model_cfg.num_experts, self.workers, groups)

    def engine_config(self, device: str) -> EngineConfig:
        return EngineConfig(
            dtype=self.dtype,
            device=device,
            max_num_seqs=self.max_num_seqs,
            max_tokens_per_step=self.max_tokens_per_step,
            block_size=self.block_size,
            kv_cache_tokens=self.kv_cache_tokens,
            max_model_len=self.max_model_len,
        )


class ServeArgs(ClusterConfig):
    """`expertmesh serve` flags and the `args` of `build_app` (Serve config files)."""

    model: str | None = Field(
        None, description="checkpoint directory; default: the built-in tiny model"
    )
    served_model_name: str | None = Field(
        None, description="model id in the API; default: --model as given"
    )
    api_keys: list[str] = Field(
        [],
        description="an accepted API key as KEY or KEY:rpm=N:tpm=M (requests and tokens per "
        "minute), repeatable; also EXPERTMESH_API_KEYS (comma-separated); none: no auth",
        json_schema_extra={"flag": "--api-key", "action": "append"},
    )
    api_keys_file: str | None = Field(
        None, description="a file of API key entries (KEY[:rpm=N][:tpm=M]), one per line"
    )
    address: str | None = Field(
        None, description="Ray cluster to join; default: a local Ray on 127.0.0.1"
    )
    gateways: str = Field(
        "1",
        pattern=r"^(auto|[1-9][0-9]*)$",
        description="gateway replicas (attention, router, KV cache) sharing one pool of expert "
        "workers; auto: Serve scales them between --min-gateways and --max-gateways on load",
    )
    min_gateways: int = Field(1, ge=1, description="gateway replicas at least (--gateways auto)")

    @field_validator("max_gateways")
    @classmethod
    def _at_least_min(cls, v: int, info: ValidationInfo) -> int:
        if v < info.data.get("min_gateways", 1):
            raise ValueError("max_gateways must be at least min_gateways")
        return v

    @field_validator("gateways", mode="before")
    @classmethod
    def _gateways_as_text(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    max_gateways: int = Field(4, ge=1, description="gateway replicas at most (--gateways auto)")
    target_gateway_requests: int = Field(
        32, ge=1, description="autoscaling target: ongoing requests per gateway replica"
    )
    gateway_timeout_s: float = Field(
        5,
        gt=0,
        description="a gateway whose stream stays silent this long is taken as hung: its "
        "requests continue on another gateway",
    )
    pin_cpus: bool = Field(
        False,
        description="give each gateway (and expert worker) cores of its own, with torch threads "
        "to match, and keep every other process of the server on the rest (Linux, a Ray this "
        "command starts)",
    )
    min_replicas: int = Field(1, ge=1, description="ingress replicas at least")
    max_replicas: int = Field(2, ge=1, description="ingress replicas at most")
    target_ongoing_requests: int = Field(
        64, ge=1, description="autoscaling target per ingress replica"
    )
    max_ongoing_requests: int = Field(
        512, ge=1, description="requests one ingress replica takes at once"
    )
    max_queued_requests: int = Field(
        1024, ge=1, description="HTTP requests queued for an ingress replica; beyond: 503"
    )
    max_inflight: int = Field(
        1024, ge=1, description="engine requests in flight from one ingress replica; beyond: 429"
    )
    max_body_bytes: int = Field(
        8 * 2**20, ge=1024, description="request body size limit in bytes; beyond: 413"
    )
    max_choices_per_request: int = Field(
        64, ge=1, description="prompts x n of one request at most; beyond: 400"
    )
    max_request_tokens: int = Field(
        65536,
        ge=1,
        description="prompt + max_tokens summed over a request's choices at most; beyond: 400",
    )
    max_images_per_request: int = Field(
        8, ge=0, description="image parts of one chat request at most (VL models); beyond: 400"
    )
    max_image_bytes: int = Field(
        5 * 2**20, ge=1024, description="encoded size of one image at most; beyond: 400"
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="width x height of one image at most; beyond: 400"
    )
    allow_remote_images: bool = Field(
        False, description="fetch http(s) image URLs (else only data: URLs are taken)"
    )
    image_fetch_timeout_s: float = Field(
        10, gt=0, description="time limit for fetching one remote image"
    )
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens of chat requests that give none"
    )
    host: str = Field("127.0.0.1", description="HTTP host")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")

    @model_validator(mode="after")
    def _one_gateway_moves_experts(self) -> ServeArgs:
        if self.rebalance_period_s > 0 and not self.in_process and self.gateways != "1":
            raise ValueError(
                "--rebalance-period-s needs --gateways 1 (or --transport local): the gateways "
                "sharing the expert pool would have to switch placements together, which is "
                "not implemented"
            )
        if self.redundant_experts and not self.rebalance_period_s:
            raise ValueError("--redundant-experts needs --rebalance-period-s")
        return self

    def resolve_model(self) -> tuple[str, str]:
        """(checkpoint path, served model id); no --model means the built-in model."""
        if self.model:
            path = str(Path(self.model).expanduser())
            return path, self.served_model_name or self.model
        return str(builtin_model_dir()), self.served_model_name or BUILTIN_NAME

    def cluster_config(self, model: str | None = None) -> ClusterConfig:
        """The ClusterConfig part of these args, with the resolved checkpoint path."""
        fields = self.model_dump(include=set(ClusterConfig.model_fields))
        return ClusterConfig(**{**fields, "model": model or self.resolve_model()[0]})


BUILTIN_NAME = "ernie-tiny"
BUILTIN_VERSION = 2  # bumped when make_tiny's output changes, so no stale cached copy is served


def default_home() -> Path:
    return Path(os.environ.get("EXPERTMESH_HOME", Path.home() / ".cache" / "expertmesh"))


def builtin_model_dir() -> Path:
    """The built-in default model: a small random ERNIE 4.5 MoE, made on first use."""
    path = default_home() / f"{BUILTIN_NAME}-v{BUILTIN_VERSION}"
    if (path / "config.json").is_file():
        return path
    from expertmesh.ernie.tiny import make_tiny

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tiny-"))
    make_tiny(tmp, seed=0)
    try:
        os.rename(tmp, path)  # atomic: a concurrent maker's copy wins, ours is dropped
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path

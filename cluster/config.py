"""The cluster's typed config: what a gateway and its expert workers are made of."""

from __future__ import annotations

from typing import Literal

from expertmesh.router.engine import EngineConfig
from pydantic import BaseModel, ConfigDict, Field


class ClusterConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="checkpoint directory in the Hugging Face Hub layout")
    workers: int = Field(2, ge=1, description="expert workers (one shard of experts each)")
    expert_map: list[int] | None = Field(
        None, description="owner worker of each expert; default: contiguous blocks"
    )
    transport: Literal["grpc", "collective", "local"] = Field(
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
    gateway_threads: int = Field(2, ge=1, description="torch threads in the gateway process")
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

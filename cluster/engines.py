"""Build an engine for the chosen transport: in-process shards, or expert workers on Ray."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from expertmesh.router.engine import Completion, EngineConfig, LLMEngine, RequestError
from expertmesh.router.sampling import SamplingParams

from .args import EngineArgs
from .config import ClusterConfig


def local_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def engine_config(a: EngineArgs) -> EngineConfig:
    return EngineConfig(dtype=a.dtype, device=local_device(a.device))


class ClusterEngine:
    """`generate` like LLMEngine's, run by a gateway actor over Ray expert workers."""

    def __init__(self, handle):
        self.handle = handle

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        runs = self.handle.generate_all(
            [list(p) for p in prompts], [dataclasses.asdict(p) for p in params]
        )
        return [_completion(i, p, events) for i, (p, events) in enumerate(zip(prompts, runs))]


def _completion(i: int, prompt, events: list[dict]) -> Completion:
    c = Completion(f"generate-{i}", list(prompt))
    for ev in events:
        if ev["error"]:
            raise RequestError(ev["error"])
        if ev["token_id"] is not None:
            c.token_ids.append(ev["token_id"])
            c.logprobs.append(ev["logprob"])
            if ev["top_logprobs"] is not None:
                c.top_logprobs.append([tuple(x) for x in ev["top_logprobs"]])
        c.finish_reason = ev["finish_reason"]
    return c


@contextmanager
def open_engine(path: Path, a: EngineArgs) -> Iterator:
    """An engine over `a.workers` expert shards reached by `a.transport`; closed on exit."""
    if a.transport == "local":
        engine = LLMEngine.from_checkpoint(path, engine_config(a), num_shards=a.workers)
        try:
            yield engine
        finally:
            engine.close()
        return
    import ray

    from .launch import GatewayHandle, start_ray

    started = not ray.is_initialized()
    start_ray()
    cfg = ClusterConfig(
        model=str(path),
        workers=a.workers,
        transport=a.transport,
        dtype=a.dtype,
        device=a.device,
    )
    handle = GatewayHandle(cfg)
    try:
        yield ClusterEngine(handle)
    finally:
        handle.shutdown()
        if started:
            ray.shutdown()

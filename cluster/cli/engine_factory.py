"""The CLI's engine factory: an engine for `generate` and `bench engine` on any transport.

`local` builds the in-process engine (no Ray); the other transports start (or join) a Ray,
launch a gateway actor with its expert workers, and drive it through `ClusterEngine`, whose
`generate` looks like `LLMEngine.generate`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from expertmesh.ernie.devices import resolve_device
from expertmesh.router.engine import Completion, LLMEngine, RequestError
from expertmesh.router.sampling import SamplingParams

from ..config import ClusterConfig


class ClusterEngine:
    """`generate` like LLMEngine's, run by a gateway actor over Ray expert workers."""

    def __init__(self, handle):
        self.handle = handle

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        images: Sequence | None = None,
    ) -> list[Completion]:
        """images (VL): per prompt, its images (PIL or ImageInputs) or None."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        runs = self.handle.generate_all([list(p) for p in prompts], list(params), images)
        return [_completion(i, p, events) for i, (p, events) in enumerate(zip(prompts, runs))]


def _completion(i: int, prompt, events: list) -> Completion:
    c = Completion(f"generate-{i}", list(prompt))
    for ev in events:
        if ev.error is not None:
            raise RequestError(ev.error)
        if ev.token_id is not None:
            c.token_ids.append(ev.token_id)
            c.logprobs.append(ev.logprob)
            if ev.top_logprobs is not None:
                c.top_logprobs.append([tuple(x) for x in ev.top_logprobs])
        c.finish_reason = ev.finish_reason
    return c


def _model_cfg(cfg: ClusterConfig):
    from expertmesh.ernie.config import ModelConfig

    return ModelConfig.from_dir(cfg.model)


@contextmanager
def open_engine(cfg: ClusterConfig) -> Iterator:
    """An engine over `cfg.workers` expert shards reached by `cfg.transport`; closed on exit."""
    if cfg.in_process:
        device = resolve_device(cfg.device)
        engine = LLMEngine.from_checkpoint(
            Path(cfg.model), cfg.engine_config(device), placement=cfg.placement(_model_cfg(cfg))
        )
        try:
            yield engine
        finally:
            engine.close()
        return
    import ray

    from ..runtime.launch import GatewayHandle, start_ray

    started = not ray.is_initialized()
    start_ray()
    handle = GatewayHandle(cfg)
    try:
        yield ClusterEngine(handle)
    finally:
        handle.shutdown()
        if started:
            ray.shutdown()

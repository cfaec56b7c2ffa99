"""The gateway: attention, routing and the engine loop of one model replica.

A plain class, run as a Ray actor (`expertmesh generate --transport grpc`) or as a Ray Serve
deployment. It creates its expert workers in the bundles of its placement group, loads the
non-expert weights itself, and streams each request's tokens from the engine thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator

import ray
import torch
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.router.engine import LLMEngine, TokenEvent
from expertmesh.router.loop import EngineLoop
from expertmesh.router.model import GatewayModel
from expertmesh.router.sampling import SamplingParams
from expertmesh.workers.placement import ExpertPlacement

from .config import ClusterConfig
from .workerset import WorkerSet

log = logging.getLogger(__name__)


def resolve_device(cfg: ClusterConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def gpus_per_actor(cfg: ClusterConfig) -> float:
    """One GPU per actor when there are enough; else they share (NCCL then falls back to gloo)."""
    total = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if cfg.device == "cpu" or total == 0:
        return 0
    actors = cfg.workers + 1
    return 1 if total >= actors else int(100 * total / actors) / 100


class Gateway:
    def __init__(self, cfg: ClusterConfig | dict):
        cfg = ClusterConfig.model_validate(cfg)
        self.cfg = cfg
        torch.set_num_threads(cfg.gateway_threads)
        self.device = resolve_device(cfg)
        self.model_cfg = ModelConfig.from_dir(cfg.model)
        n = self.model_cfg.num_experts
        if cfg.expert_map:
            placement = ExpertPlacement.from_map(cfg.expert_map, n)
        else:
            placement = ExpertPlacement.contiguous(n, cfg.workers)
        engine_cfg = cfg.engine_config(self.device)
        self.workers: WorkerSet | None = None
        if cfg.transport == "local":
            engine = LLMEngine.from_checkpoint(cfg.model, engine_cfg, placement=placement)
        else:
            self.workers = WorkerSet(cfg, placement, gpus_per_actor(cfg))  # they load meanwhile
            with CheckpointReader(cfg.model) as reader:
                dtype = engine_cfg.torch_dtype(self.model_cfg)
                model = GatewayModel.load(reader, self.model_cfg, dtype, self.device)
            self.workers.wait_ready()
            host = ray.util.get_node_ip_address()
            dispatcher = self.workers.make_dispatcher(host)
            engine = LLMEngine(model, dispatcher, self.model_cfg, engine_cfg)
        self.loop = EngineLoop(engine)
        self._probe: tuple[float, bool] = (0.0, True)  # (when, workers answered)
        self._channels: dict[str, dict] = {}  # ingress streams: queue and open request ids
        log.info("gateway ready: %s transport, %d workers", cfg.transport, placement.num_shards)

    # -- requests ---------------------------------------------------------------------------

    async def generate(
        self, prompt_ids: list[int], params: dict | SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[list[dict]]:
        """Stream a request's tokens: lists of TokenEvent dicts; the last one has finish_reason.

        Closing the stream early (a client that went away) aborts the request at once.
        """
        if isinstance(params, dict):
            params = SamplingParams(**params)
        rid = request_id or uuid.uuid4().hex
        refusal = await self._refusal(rid)
        if refusal is not None:
            yield [dataclasses.asdict(refusal)]
            return
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.loop.submit(
            rid, prompt_ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        )
        finished = False
        try:
            while not finished:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                finished = batch[-1].finish_reason is not None
                yield [vars(ev).copy() for ev in batch]  # shallow: events are not reused
        finally:
            if not finished:
                self.loop.abort(rid)

    # -- multiplexed streams: one per ingress replica, carrying all of its requests ---------

    def _channel(self, channel_id: str) -> dict:
        return self._channels.setdefault(channel_id, {"queue": asyncio.Queue(), "rids": set()})

    async def submit(
        self, prompt_ids: list[int], params: dict, request_id: str, channel_id: str
    ) -> dict | None:
        """Queue a request whose events go to `channel_id`; an error event dict if refused."""
        refusal = await self._refusal(request_id)
        if refusal is not None:
            return vars(refusal).copy()
        ch = self._channel(channel_id)
        ch["rids"].add(request_id)
        loop = asyncio.get_running_loop()
        self.loop.submit(
            request_id,
            prompt_ids,
            SamplingParams(**params),
            lambda ev: loop.call_soon_threadsafe(ch["queue"].put_nowait, ev),
        )
        return None

    async def channel(self, channel_id: str) -> AsyncIterator[list[dict]]:
        """The events of every request submitted to `channel_id`, in batches as they come.

        One stream item per step for all of an ingress replica's requests, instead of one per
        request per token. Closing the stream aborts the channel's unfinished requests.
        """
        ch = self._channel(channel_id)
        try:
            while True:
                batch = [await ch["queue"].get()]
                while not ch["queue"].empty():
                    batch.append(ch["queue"].get_nowait())
                for ev in batch:
                    if ev.finish_reason is not None:
                        ch["rids"].discard(ev.request_id)
                yield [vars(ev).copy() for ev in batch]
        finally:
            for rid in ch["rids"]:
                self.loop.abort(rid)
            self._channels.pop(channel_id, None)

    async def generate_all(self, prompts: list[list[int]], params: list[dict]) -> list[list[dict]]:
        """Run several requests concurrently to completion; all events of each, in order."""

        async def one(prompt, p):
            events = []
            async for batch in self.generate(prompt, p):
                events.extend(batch)
            return events

        return await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params, strict=True)))

    async def _refusal(self, rid: str) -> TokenEvent | None:
        """An error event when the request cannot be taken now (queue full, workers down)."""
        if self.loop.counts()[1] >= self.cfg.max_waiting:
            return TokenEvent(
                rid,
                None,
                finish_reason="error",
                status=429,
                error=f"the waiting queue is full ({self.cfg.max_waiting} requests)",
            )
        if not await self._workers_up():
            return TokenEvent(
                rid,
                None,
                finish_reason="error",
                status=503,
                error="expert workers are down; retry shortly",
            )
        return None

    async def _workers_up(self, ttl_s: float = 1.0) -> bool:
        """Whether every worker answered a probe in the last `ttl_s` (a dead one cannot)."""
        if self.workers is None:
            return True
        when, ok = self._probe
        now = time.monotonic()
        if now - when > ttl_s:
            ok = (await self.health(timeout_s=0.5))["workers"]
            self._probe = (now, ok)
        return ok

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    # -- state ------------------------------------------------------------------------------

    async def health(self, timeout_s: float = 2.0) -> dict:
        """Ready only when the engine runs and every expert worker answers."""
        workers_ok = True
        if self.workers is not None:
            refs = [a.ready.remote() for a in self.workers.actors]
            try:
                await asyncio.wait_for(asyncio.gather(*refs), timeout_s)
            except Exception:
                workers_ok = False
        alive = self.loop.alive
        return {"ready": alive and workers_ok, "engine": alive, "workers": workers_ok}

    def stats(self) -> dict:
        running, waiting = self.loop.counts()
        return {"running": running, "waiting": waiting}

    def expert_counts(self) -> dict:
        """Tokens routed to each expert: {"layers": [layer ids], "counts": [[per expert]]}."""
        engine = self.loop.engine
        return {"layers": list(self.model_cfg.moe_layers), "counts": engine.expert_counts.tolist()}

    def check_health(self) -> None:
        """Ray Serve's probe: only the engine thread matters (workers recover on their own)."""
        if not self.loop.alive:
            raise RuntimeError("the engine loop has stopped")

    async def worker_infos(self) -> list[dict]:
        if self.workers is None:
            return []
        return list(await asyncio.gather(*(a.ready.remote() for a in self.workers.actors)))

    def model_info(self) -> dict:
        c = self.model_cfg
        return {"vocab_size": c.vocab_size, "max_model_len": self.loop.engine.max_model_len}

    def bench_exchange(self, rows: list[int], repeats: int) -> dict[int, float]:
        """Seconds of one MoE-layer exchange per row count (call while the engine is idle)."""
        from .bench import time_exchange

        engine = self.loop.engine
        dtype = next(engine.model.parameters()).dtype
        return {
            r: time_exchange(engine.dispatcher, self.model_cfg, r, repeats, dtype) for r in rows
        }

    def shutdown(self) -> None:
        self.loop.stop()
        if self.workers is not None:
            self.workers.shutdown()

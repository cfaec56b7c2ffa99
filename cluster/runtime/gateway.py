"""The gateway: attention, routing and the engine loop of one model replica.

A plain class, run as a Ray actor (`expertmesh generate --transport grpc`) or as a Ray Serve
deployment (`ServedGateway`). Alone, it starts its expert workers through the link of its
transport (in the bundles of its placement group); as one of several replicas it reaches the
workers of a shared pool (`pool.ExpertPool`). It loads the non-expert weights itself, and
streams events from the engine thread to channels: one per ingress replica (see
`protocol.GatewayAPI`). A channel says it is alive (an empty batch) when it has had nothing
to say for a while, so the ingress can tell a hung gateway from an idle one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import ray
import torch
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.devices import resolve_device
from expertmesh.ernie.image import ImageInputs, ImageSettings
from expertmesh.router.dispatch import ExchangeLoad, time_exchange
from expertmesh.router.engine import LLMEngine
from expertmesh.router.events import ErrorKind, TokenEvent, error_event
from expertmesh.router.loop import EngineLoop
from expertmesh.router.model import GatewayModel
from expertmesh.router.rebalance import Rebalancer
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.structured import Grammars, StructuredOutputError
from expertmesh.workers.placement import ExpertPlacement

from ..config import ClusterConfig
from .links import make_link
from .pool import PooledWorkers
from .protocol import Health, ModelInfo
from .resources import gpus_per_actor, placement_strategy
from .workerset import Workers

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0  # an idle channel sends an empty batch this often


class _Channel:
    def __init__(self):
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.rids: set[str] = set()  # its requests that have not finished


class Gateway:
    replica_id = "gateway"  # which replica this is (ServedGateway: Serve's replica id)

    def __init__(
        self, cfg: ClusterConfig | dict, workers: Workers | None = None, gateways: int = 1
    ):
        """workers: a pool shared with other gateways (else this one starts its own);
        gateways: how many gateway replicas share them at most (to divide the GPUs)."""
        cfg = ClusterConfig.model_validate(cfg)
        self.cfg = cfg
        torch.set_num_threads(cfg.gateway_torch_threads(gateways))
        self.device = resolve_device(cfg.device, gpu_assigned=bool(ray.get_gpu_ids()))
        self.model_cfg = ModelConfig.from_dir(cfg.model)
        placement = cfg.placement(self.model_cfg)
        engine_cfg = cfg.engine_config(self.device)
        dtype = engine_cfg.torch_dtype(self.model_cfg)
        self.link = make_link(cfg, placement, gpus_per_actor(cfg, gateways), workers)
        self.link.start()  # workers load their shards meanwhile
        with CheckpointReader(cfg.model) as reader:
            model = GatewayModel.load(reader, self.model_cfg, dtype, self.device)
        dispatcher = self.link.connect(self.model_cfg, dtype, self.device)
        images = ImageSettings.from_dir(cfg.model)
        grammars = Grammars(cfg.model, self.model_cfg)
        engine = LLMEngine(model, dispatcher, self.model_cfg, engine_cfg, images, grammars)
        self.rebalancer = Rebalancer(
            dispatcher,
            self.link.hold,
            lambda: engine.expert_counts,
            cfg.rebalance_period_s,
            cfg.redundant_experts,
        )
        self.loop = EngineLoop(engine, self.rebalancer)
        self._probe: tuple[float, bool] = (0.0, True)  # (when, workers answered)
        self._channels: dict[str, _Channel] = {}
        self._done: dict[str, asyncio.Event] = {}  # request id -> set when its last event is out
        self._taken = 0  # requests accepted since start
        self._draining: str | None = None  # why new requests are refused, once draining
        log.info("gateway ready: %s transport, %d workers", cfg.transport, placement.num_shards)

    # -- requests ---------------------------------------------------------------------------

    async def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        channel_id: str,
        images: ImageInputs | list | None = None,
        resume_ids: list[int] = (),
    ) -> TokenEvent | None:
        """Queue a request whose events go to `channel_id`; an error event if it is refused.
        images (VL): one per image placeholder in the prompt, preprocessed or PIL.
        resume_ids: output tokens it already has (it moved here from a gateway that failed)."""
        refusal = await self._refusal(request_id)
        if refusal is not None:
            return refusal
        if params.structured is not None:  # compiled here, off the engine loop (then cached)
            try:
                await asyncio.to_thread(self.loop.engine.grammars.compile, params.structured)
            except StructuredOutputError as e:
                return error_event(request_id, ErrorKind.INVALID, str(e))
        ch = self._channel(channel_id)
        ch.rids.add(request_id)
        self._taken += 1
        done = self._done[request_id] = asyncio.Event()
        loop = asyncio.get_running_loop()

        def deliver(ev: TokenEvent) -> None:  # on this event loop
            ch.queue.put_nowait(ev)
            if ev.finish_reason is not None:
                done.set()

        self.loop.submit(
            request_id,
            prompt_ids,
            params,
            lambda ev: loop.call_soon_threadsafe(deliver, ev),
            images=images,
            resume_ids=resume_ids,
        )
        return None

    async def run(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        channel_id: str,
        images: ImageInputs | list | None = None,
        resume_ids: list[int] = (),
    ) -> AsyncIterator[dict]:
        """`submit` as a call that lasts as long as the request: first
        {"replica": this replica's id, "refusal": an error event or None}, then nothing until
        the request ends. Its events travel on the channel; what this call adds is that the
        gateway holds one ongoing call per running request, which is the load that Serve's
        routing and autoscaling see. Cancelling it aborts the request."""
        refusal = await self.submit(prompt_ids, params, request_id, channel_id, images, resume_ids)
        yield {"replica": self.replica_id, "refusal": refusal}
        if refusal is not None:
            return
        done = self._done[request_id]
        try:
            await done.wait()
        finally:
            if not done.is_set():
                self.loop.abort(request_id)
            self._done.pop(request_id, None)

    def _channel(self, channel_id: str) -> _Channel:
        return self._channels.setdefault(channel_id, _Channel())

    async def channel(self, channel_id: str) -> AsyncIterator[list[TokenEvent]]:
        """The events of every request submitted to `channel_id`, in batches as they come.

        One stream item per step for all of an ingress replica's requests, instead of one per
        request per token. Closing the stream aborts the channel's unfinished requests.
        """
        ch = self._channel(channel_id)
        try:
            while True:
                try:
                    batch = [await asyncio.wait_for(ch.queue.get(), HEARTBEAT_S)]
                except TimeoutError:
                    yield []  # alive, nothing to say
                    continue
                while not ch.queue.empty():
                    batch.append(ch.queue.get_nowait())
                for ev in batch:
                    if ev.finish_reason is not None:
                        ch.rids.discard(ev.request_id)
                yield batch
        finally:
            for rid in ch.rids:
                self.loop.abort(rid)
            self._channels.pop(channel_id, None)

    async def generate_all(
        self, prompts: list[list[int]], params: list[SamplingParams], images: list | None = None
    ) -> list[list[TokenEvent]]:
        """Run several requests concurrently to completion; all events of each, in order.
        images (VL): per prompt, its images or None."""
        images = images or [None] * len(prompts)
        channel_id = uuid.uuid4().hex
        rids = [f"{channel_id}-{i}" for i in range(len(prompts))]
        events: dict[str, list[TokenEvent]] = {rid: [] for rid in rids}
        open_ = set(rids)
        self._channel(channel_id)
        for rid, prompt, p, imgs in zip(rids, prompts, params, images, strict=True):
            refusal = await self.submit(prompt, p, rid, channel_id, imgs)
            if refusal is not None:
                events[rid].append(refusal)
                open_.discard(rid)
        stream = self.channel(channel_id)
        try:
            while open_:
                for ev in await anext(stream):  # (an empty batch is a heartbeat)
                    events[ev.request_id].append(ev)
                    if ev.finish_reason is not None:
                        open_.discard(ev.request_id)
        finally:
            await stream.aclose()
        return [events[rid] for rid in rids]

    async def _refusal(self, rid: str) -> TokenEvent | None:
        """An error event when the request cannot be taken now (queue full, workers down)."""
        if self._draining:
            return error_event(rid, ErrorKind.UNAVAILABLE, self._draining)
        if self.loop.counts()[1] >= self.cfg.max_waiting:
            message = f"the waiting queue is full ({self.cfg.max_waiting} requests)"
            return error_event(rid, ErrorKind.OVERLOADED, message)
        if not await self._workers_up():
            return error_event(rid, ErrorKind.UNAVAILABLE, "expert workers are down; retry shortly")
        return None

    async def _workers_up(self, ttl_s: float = 1.0) -> bool:
        """Whether every worker answered a probe in the last `ttl_s` (a dead one cannot)."""
        if self.link.workers is None:
            return True
        when, ok = self._probe
        now = time.monotonic()
        if now - when > ttl_s:
            ok = (await self.health(timeout_s=0.5))["workers"]
            self._probe = (now, ok)
        return ok

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    def drain(self, message: str = "the server is shutting down") -> None:
        """Refuse new requests and end every open one with an error event (before a stop)."""
        self._draining = message
        self.loop.drain(message)

    # -- state ------------------------------------------------------------------------------

    async def health(self, timeout_s: float = 0.5) -> Health:
        """Ready only when the engine runs and every expert worker answers."""
        workers_ok = True
        if self.link.workers is not None:
            refs = [a.ready.remote() for a in self.link.workers.actors]
            try:
                await asyncio.wait_for(asyncio.gather(*refs), timeout_s)
            except Exception:
                workers_ok = False
        alive = self.loop.alive
        return Health(
            ready=alive and workers_ok,
            engine=alive,
            workers=workers_ok,
            strategy=placement_strategy(),
            requests=self._taken,
            node_id=ray.get_runtime_context().get_node_id(),
        )

    def stats(self) -> dict:
        running, waiting = self.loop.counts()
        return {"replica": self.replica_id, "running": running, "waiting": waiting}

    def expert_counts(self) -> dict:
        """Tokens routed to each expert: {"layers": [layer ids], "counts": [[per expert]]}."""
        engine, c = self.loop.engine, self.model_cfg
        return {
            "layers": list(c.moe_layers),
            "counts": engine.expert_counts.tolist(),  # [moe_layers, experts (VL: text, vision)]
            "text_experts": c.num_text_experts,
        }

    def check_health(self) -> None:
        """Ray Serve's probe: only the engine thread matters (workers recover on their own)."""
        if not self.loop.alive:
            raise RuntimeError("the engine loop has stopped")

    async def worker_infos(self) -> list[dict]:
        if self.link.workers is None:
            return []
        return list(await asyncio.gather(*(a.ready.remote() for a in self.link.workers.actors)))

    def model_info(self) -> ModelInfo:
        c = self.model_cfg
        return ModelInfo(vocab_size=c.vocab_size, max_model_len=self.loop.engine.max_model_len)

    def bench_exchange(self, rows: list[int], repeats: int) -> dict[int, float]:
        """Seconds of one MoE-layer exchange per row count (call while the engine is idle)."""
        engine = self.loop.engine
        dtype = next(engine.model.parameters()).dtype
        return {
            r: time_exchange(engine.dispatcher, self.model_cfg, r, repeats, dtype) for r in rows
        }

    def expert_load(self, reset: bool = False) -> dict:
        """The current placement (each expert's workers) and what the exchanges since the
        last reset sent each worker (`ExchangeLoad.snapshot`); `reset` starts a new count."""
        dispatcher = self.loop.engine.dispatcher
        copies = [list(c) for c in dispatcher.placement.copies]
        out = {"copies": copies, "moves": self.rebalancer.moves, **dispatcher.load.snapshot()}
        if reset:
            dispatcher.load = ExchangeLoad(dispatcher.placement.num_shards)
        return out

    def move_experts(self, copies: list[list[int]] | None = None, timeout_s: float = 600) -> dict:
        """Move the experts live to the placement `copies` (each expert's workers), or to
        the balanced one for the load since the last look (none if it gains too little);
        returns `expert_load()` once the move is done."""

        def start():
            if copies is None:
                target = self.rebalancer.propose()
            else:
                n = self.loop.engine.dispatcher.placement.num_shards
                target = ExpertPlacement.from_copies(copies, n)
            return None if target is None else self.rebalancer.move_to(target)

        moving = self.loop.call(start).result(timeout_s)
        if moving is not None:
            moving.result(timeout_s)
        return self.expert_load()

    def shutdown(self) -> None:
        self.loop.stop()
        self.link.close()


class ServedGateway(Gateway):
    """The gateway as a Ray Serve deployment replica; with `pool`, one of several sharing it.

    Its constructor runs on a thread, off Serve's event loop: it loads weights for a while, and
    it asks the pool (a deployment handle, whose blocking calls refuse to run on an event loop)
    for the shared workers."""

    async def __init__(self, cfg: ClusterConfig | dict, pool=None, gateways: int = 1):
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        workers = PooledWorkers(pool) if pool is not None else None
        await asyncio.to_thread(super().__init__, cfg, workers, gateways)

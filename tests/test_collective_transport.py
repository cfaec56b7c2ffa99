"""The collective transport (gloo on CPU) with expert workers in processes of their own, no Ray.

The test process is the gateway (rank 0); each worker process loads its shard and runs a small
control loop: every port it is sent is a group to join and serve, on a thread, as a Ray actor
would. A worker's serve() ends on SHUTDOWN (the process then exits 0) or when its group breaks
(it reports why and waits for the next port).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch
from conftest import CONFIGS, prompts_of
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.router.collective_dispatch import CollectiveDispatcher
from expertmesh.router.dispatch import WorkerUnavailable
from expertmesh.router.engine import EngineConfig, LLMEngine
from expertmesh.router.model import GatewayModel
from expertmesh.router.sampling import SamplingParams
from expertmesh.workers.collective import CollectiveWorker
from expertmesh.workers.experts import ExpertShard
from expertmesh.workers.placement import ExpertPlacement
from serving import listen_port
from test_parity import TOL, ref_logits

ADDR = "127.0.0.1"
TIMEOUT_S = 30.0  # group formation and per-op deadline; failures are caught far sooner
GRACE_S = 5.0  # a worker told to rejoin waits this long for its old serve() to end by itself
CKPT = CONFIGS["top2of8-shared1"]
pytestmark = pytest.mark.slow  # worker processes of their own
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def load_shard(path, index: int, num_shards: int) -> ExpertShard:
    cfg = ModelConfig.from_dir(path)
    experts = ExpertPlacement.contiguous(cfg.num_experts, num_shards).experts_of(index)
    with CheckpointReader(path) as reader:
        return ExpertShard.load(reader, cfg, experts, torch.float32)


def worker_main(path, index: int, num_shards: int, control, events) -> None:
    """A worker process: join and serve the group on every port that arrives on `control`."""
    torch.set_num_threads(1)
    worker = CollectiveWorker(load_shard(path, index, num_shards))

    def serve() -> None:
        reason = worker.serve()
        events.put((index, reason))
        if reason is None:  # SHUTDOWN: end the control loop too
            control.put(None)

    serving = None
    while (port := control.get()) is not None:
        if serving is not None:
            serving.join(GRACE_S)  # dropping the old group ends serve() by itself...
            worker.stop()  # ...or this does
            serving.join()
        worker.join(ADDR, port, index + 1, num_shards + 1, timeout_s=TIMEOUT_S)
        serving = threading.Thread(target=serve)
        serving.start()
    if serving is not None:
        serving.join()


class Workers:
    """Worker processes for every shard of a checkpoint, and the gateway's dispatcher."""

    def __init__(self, path, num_shards: int):
        self.path, self.num_shards = path, num_shards
        self.ctx = mp.get_context("spawn")
        self.events = self.ctx.Queue()
        self.recoveries = 0
        self.procs: list = [None] * num_shards
        self.controls: list = [None] * num_shards
        for w in range(num_shards):
            self.start(w)

    def start(self, w: int) -> None:
        self.controls[w] = self.ctx.Queue()
        args = (self.path, w, self.num_shards, self.controls[w], self.events)
        self.procs[w] = self.ctx.Process(target=worker_main, args=args, daemon=True)
        self.procs[w].start()

    def dead(self) -> set[int]:
        return {w for w, p in enumerate(self.procs) if not p.is_alive()}

    def connect(self, dispatcher_cls=CollectiveDispatcher, **kw) -> CollectiveDispatcher:
        port = listen_port()
        for c in self.controls:
            c.put(port)
        placement = ExpertPlacement.contiguous(
            ModelConfig.from_dir(self.path).num_experts, self.num_shards
        )
        d = dispatcher_cls(
            placement,
            ADDR,
            port,
            self.num_shards + 1,
            timeout_s=TIMEOUT_S,
            liveness=self.dead,
            **kw,
        )
        d.connect()
        return d

    def recover_hook(self, dispatcher: CollectiveDispatcher):
        """Restart dead workers, then have every worker and the gateway form a new group."""

        def recover(failure) -> None:
            self.recoveries += 1
            for w in failure.workers:
                self.procs[w].join(2.0)  # a worker named but still alive is not restarted
                if not self.procs[w].is_alive():
                    self.start(w)
            port = listen_port()
            for c in self.controls:
                c.put(port)
            dispatcher.rebuild(port)

        return recover

    def reports(self, timeout: float = 60.0) -> list[tuple[int, str | None]]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < self.num_shards and time.monotonic() < deadline:
            try:
                out.append(self.events.get(timeout=max(0.0, deadline - time.monotonic())))
            except Exception:
                break
        return out

    def kill_all(self) -> None:
        for p in self.procs:
            if p is not None and p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            if p is not None:
                p.join(60)


@pytest.fixture
def workers(make_checkpoint):
    started: list[Workers] = []

    def make(num_shards: int) -> Workers:
        started.append(Workers(make_checkpoint(**CKPT), num_shards))
        return started[-1]

    yield make
    for w in started:
        w.kill_all()


def gateway_engine(path, dispatcher) -> LLMEngine:
    cfg = ModelConfig.from_dir(path)
    with CheckpointReader(path) as reader:
        model = GatewayModel.load(reader, cfg, torch.float32)
    return LLMEngine(model, dispatcher, cfg, EngineConfig())


def local_tokens(path, prompts, num_shards: int) -> list[list[int]]:
    engine = LLMEngine.from_checkpoint(path, num_shards=num_shards)
    return [c.token_ids for c in engine.generate(prompts, GREEDY)]


class KillingDispatcher(CollectiveDispatcher):
    """SIGKILLs one worker process right after starting the `at`-th exchange."""

    def __init__(self, *args, victim=None, at: int = 0, **kw):
        super().__init__(*args, **kw)
        self.victim, self.at, self.sent = victim, at, 0

    def _send(self, layer, parts):
        handle = super()._send(layer, parts)
        self.sent += 1
        if self.sent == self.at:
            os.kill(self.victim.pid, signal.SIGKILL)
        return handle


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_parity_and_clean_shutdown(workers, make_checkpoint, num_shards):
    path = make_checkpoint(**CKPT)
    cfg = ModelConfig.from_dir(path)
    cluster = workers(num_shards)
    engine = gateway_engine(path, cluster.connect())
    local = LLMEngine.from_checkpoint(path, num_shards=num_shards)

    prompts = prompts_of([1, 7, 64], cfg.vocab_size, seed=num_shards)
    for prompt, got in zip(prompts, engine.score(prompts)):
        assert (got - ref_logits(path, prompt)).abs().max() <= TOL

    ragged = prompts_of([3, 11, 30, 1], cfg.vocab_size, seed=7)
    want = [c.token_ids for c in local.generate(ragged, GREEDY)]
    assert [c.token_ids for c in engine.generate(ragged, GREEDY)] == want

    # uneven splits with zeros: 5 rows to the first shard, 2 to the last, none to the others
    x = torch.randn(5, cfg.hidden_size)  # [5, H]
    ids = torch.tensor([[0, 1]] * 3 + [[0, 7]] * 2)  # [5, 2]; expert 7 is on the last shard
    weights = torch.rand(5, 2)
    layer = cfg.moe_layers[0]
    got = engine.dispatcher(layer, x, ids, weights)  # [5, H]
    torch.testing.assert_close(got, local.dispatcher(layer, x, ids, weights))  # fp32 rounding

    engine.close()  # SHUTDOWN to every worker
    for p in cluster.procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(cluster.reports()) == [(w, None) for w in range(num_shards)]


def test_killed_worker_is_replaced_and_generation_matches(workers, make_checkpoint):
    path = make_checkpoint(**CKPT)
    prompts = prompts_of([3, 11, 30, 1], ModelConfig.from_dir(path).vocab_size, seed=7)
    cluster = workers(2)
    victim = cluster.procs[1]
    # exchange 20 of about 100: a few decode steps in, with rows in flight
    dispatcher = cluster.connect(KillingDispatcher, victim=victim, at=20)
    dispatcher.recover = cluster.recover_hook(dispatcher)
    engine = gateway_engine(path, dispatcher)

    outs = engine.generate(prompts, GREEDY)

    assert cluster.recoveries == 1 and dispatcher.sent > 20
    assert not victim.is_alive() and cluster.procs[1] is not victim  # it was replaced
    assert [c.token_ids for c in outs] == local_tokens(path, prompts, 2)
    # the surviving worker left the broken group: its serve() ended because the gateway dropped
    # it, or, when the gateway's drop waited on ops still pending to the dead worker (up to
    # their timeout) for longer than the worker's grace, because the worker was told to rejoin
    # (seen once in CI, under load)
    (survivor,) = [r for r in cluster.reports(5.0) if r[0] == 0]
    assert survivor[1].startswith("group broke") or survivor[1] == "stopped", survivor
    engine.close()
    for p in cluster.procs:
        p.join(60)
        assert p.exitcode == 0


def test_killed_worker_without_recovery_fails_fast(workers, make_checkpoint):
    path = make_checkpoint(**CKPT)
    prompts = prompts_of([5, 9], ModelConfig.from_dir(path).vocab_size, seed=3)
    cluster = workers(2)
    engine = gateway_engine(path, cluster.connect())
    engine.generate(prompts, SamplingParams(max_tokens=2, temperature=0))  # warm

    os.kill(cluster.procs[0].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerUnavailable):
        engine.generate(prompts, GREEDY)
    assert time.monotonic() - t0 < 5.0
    engine.close()  # a broken group: nothing is sent, nothing hangs

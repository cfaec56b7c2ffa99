"""The cluster on Ray: expert workers as actors behind gRPC or a collective group.

Everything runs on 127.0.0.1 (start_ray pins a local Ray to loopback).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import pytest
import ray
from conftest import CONFIGS, prompts_of
from expertmesh.cluster.cli.engine_factory import ClusterEngine
from expertmesh.cluster.runtime.launch import start_ray
from expertmesh.router.engine import LLMEngine
from expertmesh.router.sampling import SamplingParams
from test_parity import ref_greedy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TRANSPORTS = ["grpc", "tcp", "collective"]


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    start_ray(num_cpus=16)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield
    ray.shutdown()


def stream(actor, prompt, params: SamplingParams, on_token=None):
    """Consume a request's events from the driver through a gateway channel (as the ingress
    does); on_token(n) is called after each token."""
    channel, rid = uuid.uuid4().hex, uuid.uuid4().hex
    refusal = ray.get(actor.submit.remote(prompt, params, rid, channel))
    if refusal is not None:
        return [refusal]
    events = []
    gen = actor.channel.remote(channel)
    for ref in gen:
        for ev in ray.get(ref):
            events.append(ev)
            if on_token and ev.token_id is not None:
                on_token(len(events))
        if events[-1].finish_reason is not None:
            break
    ray.cancel(gen)
    return events


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parity_with_in_process_engine_and_transformers(
    make_checkpoint, gateway, transport, workers
):
    path = make_checkpoint(**CONFIGS["top4of16-shared2-start2-every2"])
    prompts = prompts_of([1, 9, 33, 4], 400, seed=workers)
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=3)
    local = LLMEngine.from_checkpoint(path).generate(prompts, params)
    h = gateway(model=str(path), workers=workers, transport=transport)
    got = ClusterEngine(h).generate(prompts, params)
    for prompt, g, want in zip(prompts, got, local):
        assert g.token_ids == want.token_ids == ref_greedy(path, prompt, 24)
        assert max(abs(a - b) for a, b in zip(g.logprobs, want.logprobs)) <= 1e-4


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigkill_of_a_worker_mid_generation(make_checkpoint, gateway, transport):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    prompt = [5, 17, 99, 3]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    want = LLMEngine.from_checkpoint(path).generate([prompt], params)[0].token_ids
    h = gateway(model=str(path), workers=2, transport=transport)
    victim = ray.get(h.actor.worker_infos.remote())[1]["pid"]
    killed = []

    def kill_once(n):
        if n >= 8 and not killed:
            os.kill(victim, signal.SIGKILL)
            killed.append(n)

    events = stream(h.actor, prompt, params, kill_once)
    assert killed and killed[0] < 64
    assert [e.token_id for e in events] == want
    assert events[-1].finish_reason == "length"
    new_pid = ray.get(h.actor.worker_infos.remote())[1]["pid"]
    assert new_pid != victim
    # the next request works too
    again = ClusterEngine(h).generate([prompt], params)[0].token_ids
    assert again == want


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hung_worker_is_restarted(make_checkpoint, gateway, transport):
    """SIGSTOP: the process lives but answers nothing; the exchange deadline catches it."""
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    prompt = [8, 30, 2, 77]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    want = LLMEngine.from_checkpoint(path).generate([prompt], params)[0].token_ids
    h = gateway(model=str(path), workers=2, transport=transport, rpc_timeout_s=2)
    victim = ray.get(h.actor.worker_infos.remote())[0]["pid"]
    stopped = []

    def freeze_once(n):
        if n >= 6 and not stopped:
            os.kill(victim, signal.SIGSTOP)
            stopped.append(n)

    try:
        events = stream(h.actor, prompt, params, freeze_once)
    finally:
        try:
            os.kill(victim, signal.SIGKILL)  # never leave a stopped process behind
        except ProcessLookupError:
            pass
    assert stopped
    assert [e.token_id for e in events] == want
    assert ray.get(h.actor.worker_infos.remote())[0]["pid"] != victim


def test_worker_that_never_returns_ends_requests_with_an_error(make_checkpoint, gateway):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    h = gateway(
        model=str(path), workers=2, transport="grpc", max_worker_restarts=0, restart_timeout_s=3
    )
    victim = ray.get(h.actor.worker_infos.remote())[0]["pid"]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    t0 = time.monotonic()
    events = stream(h.actor, [5, 6], params, lambda n: n == 4 and os.kill(victim, signal.SIGKILL))
    assert time.monotonic() - t0 < 60
    assert events[-1].finish_reason == "error"
    assert "did not come back" in events[-1].error
    assert not ray.get(h.actor.health.remote())["ready"]


def test_requests_arriving_at_different_times(make_checkpoint, gateway):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    local = LLMEngine.from_checkpoint(path)
    prompts = prompts_of([3 + 2 * i for i in range(16)], 400, seed=11)
    params = [
        SamplingParams(
            max_tokens=8 + i, temperature=0.8 if i % 3 == 0 else 0, seed=i, ignore_eos=True
        )
        for i in range(16)
    ]
    alone = [local.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    h = gateway(model=str(path), workers=2, transport="grpc")

    async def run():
        async def one(i):
            await asyncio.sleep(0.02 * i)  # staggered arrivals join the running batch
            (events,) = await h.actor.generate_all.remote([prompts[i]], [params[i]])
            return [e.token_id for e in events]

        return await asyncio.gather(*(one(i) for i in range(16)))

    assert asyncio.run(run()) == alone


def test_worker_memory_is_its_own_experts(make_checkpoint, gateway):
    path = make_checkpoint(hidden=256, layers=4, experts=16, top_k=2, heads=4, seed=4)
    h = gateway(model=str(path), workers=4, transport="grpc")
    infos = ray.get(h.actor.worker_infos.remote())
    total = sum(i["nbytes"] for i in infos)
    for info in infos:
        growth = info["rss"] - info["rss_before_load"]
        assert info["bytes_read"] == info["nbytes"]
        # about its own experts (plus allocator slack), far below the whole model's experts
        assert 0.5 * info["nbytes"] < growth < info["nbytes"] + 0.35 * total, info

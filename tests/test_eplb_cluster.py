"""Expert load balancing on Ray: live moves between worker actors, with requests running.

Everything runs on 127.0.0.1 (start_ray pins a local Ray to loopback).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from expertmesh.cluster.cli.engine_factory import ClusterEngine
from expertmesh.cluster.runtime.launch import start_ray
from expertmesh.router.engine import LLMEngine
from expertmesh.router.sampling import SamplingParams
from expertmesh.workers.placement import ExpertPlacement
from test_cluster import stream
from test_eplb import HOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    start_ray(num_cpus=16)
    yield
    ray.shutdown()


def holdings(h) -> tuple[ExpertPlacement, list[list[int]]]:
    """The gateway's placement and the experts each worker says it holds."""
    load = ray.get(h.actor.expert_load.remote())
    placement = ExpertPlacement.from_copies(load["copies"], len(load["rows"]))
    infos = ray.get(h.actor.worker_infos.remote())
    return placement, [sorted(i["experts"]) for i in infos]


@pytest.mark.parametrize("transport", ["grpc", "tcp", "collective"])
def test_a_rebalancing_period_moves_experts_under_a_running_request(
    make_checkpoint, gateway, transport
):
    path = make_checkpoint(**HOT)
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    prompts = [[5, 17, 99, 3], [40, 41, 42]]
    want = LLMEngine.from_checkpoint(path).generate(prompts, params)
    h = gateway(
        model=str(path),
        workers=2,
        transport=transport,
        rebalance_period_s=0.5,
        redundant_experts=2,
    )
    first = stream(h.actor, prompts[0], params)  # routes tokens to the hot experts
    assert [e.token_id for e in first] == want[0].token_ids
    time.sleep(0.6)  # the period is over: the next step's tick starts a move
    moves_seen = []

    def watch(n):
        if n == 150:
            moves_seen.append(ray.get(h.actor.expert_load.remote())["moves"])

    second = stream(h.actor, prompts[1], params, watch)
    assert [e.token_id for e in second] == want[1].token_ids
    assert moves_seen[0] >= 1  # a move was done while the request had 50 tokens to go
    deadline = time.monotonic() + 30  # a later period's move may still be finishing
    while (now := holdings(h))[1] != [now[0].experts_of(w) for w in range(2)]:
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    assert now[0].num_copies > 16  # copies of hot experts


def test_a_worker_restarted_after_a_move_gets_its_moved_experts(make_checkpoint, gateway):
    path = make_checkpoint(**HOT)
    prompt = [8, 30, 2, 77]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    want = LLMEngine.from_checkpoint(path).generate([prompt], params)[0].token_ids
    h = gateway(model=str(path), workers=2, transport="grpc")
    copies = [[0, 1], [1], [0], [0, 1]] + [[w % 2] for w in range(12)]
    load = ray.get(h.actor.move_experts.remote(copies))
    assert load["copies"] == copies and load["moves"] == 1
    placement, held = holdings(h)
    assert held == [placement.experts_of(w) for w in range(2)]
    victim = ray.get(h.actor.worker_infos.remote())[1]["pid"]
    killed = []

    def kill_once(n):
        if n >= 8 and not killed:
            os.kill(victim, signal.SIGKILL)  # Ray restarts it with the experts it began with
            killed.append(n)

    events = stream(h.actor, prompt, params, kill_once)
    assert killed and [e.token_id for e in events] == want
    assert ray.get(h.actor.worker_infos.remote())[1]["pid"] != victim
    assert holdings(h)[1] == held  # the link gave the new process the moved experts back
    assert ClusterEngine(h).generate([prompt], params)[0].token_ids == want

"""Two Ray nodes on one machine, both on 127.0.0.1, with expert workers on each."""

from __future__ import annotations

import os

import pytest
import ray
from conftest import CONFIGS, prompts_of
from expertmesh.cluster.cli.engine_factory import ClusterEngine
from expertmesh.cluster.config import ClusterConfig
from expertmesh.cluster.runtime.launch import GatewayHandle
from expertmesh.router.engine import LLMEngine
from expertmesh.router.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def start_cluster(nodes: int, attempts: int = 3):
    """A Ray cluster of `nodes` 2-CPU nodes on this machine, started again if Ray's start-up
    times out. Ray waits a hard-coded 30 s for a raylet to register, and 30 s by default for
    the GCS port file; on a loaded 2-core machine either can pass. A failed attempt's
    processes (children of this process that the attempt started) are killed by PID."""
    import psutil
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
    me = psutil.Process()
    for attempt in range(attempts):
        before = {p.pid for p in me.children(recursive=True)}
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=2, include_dashboard=False)
            for _ in range(nodes - 1):
                cluster.add_node(num_cpus=2)
            return cluster
        except Exception:
            try:
                cluster.shutdown()
            except Exception:
                pass
            started = [p for p in me.children(recursive=True) if p.pid not in before]
            for p in started:
                p.kill()
            psutil.wait_procs(started, timeout=10)
            if attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the nodes on loopback
    cluster = start_cluster(2)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.parametrize("transport", ["grpc", "tcp", "collective"])
def test_parity_across_two_nodes(make_checkpoint, two_nodes, transport):
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    prompts = prompts_of([5, 12, 1], 400, seed=2)
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=2)
    want = LLMEngine.from_checkpoint(path).generate(prompts, params)
    # 4 one-CPU bundles on two 2-CPU nodes: the three workers cannot all share a node
    h = GatewayHandle(
        ClusterConfig(model=str(path), workers=3, transport=transport, strategy="SPREAD")
    )
    try:
        nodes = {i["node_id"] for i in ray.get(h.actor.worker_infos.remote())}
        assert len(nodes) == 2
        got = ClusterEngine(h).generate(prompts, params)
    finally:
        h.shutdown()
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs)) <= 1e-4

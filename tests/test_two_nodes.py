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


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the nodes on loopback
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.parametrize("transport", ["grpc", "collective"])
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

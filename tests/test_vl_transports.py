"""ERNIE-4.5-VL through the worker transports, two workers, no Ray: gRPC servers in this process
(each worker holds text and vision experts) and the collective group with worker processes of
their own (plain contiguous blocks: one worker has the text experts, the other the vision
experts). Logits and greedy tokens against transformers, for every case of vl_reference."""

from __future__ import annotations

import grpc
import pytest
import torch
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.image import ImageSettings
from expertmesh.router.engine import EngineConfig, LLMEngine
from expertmesh.router.grpc_dispatch import GrpcDispatcher
from expertmesh.router.model import GatewayModel
from expertmesh.router.sampling import SamplingParams
from expertmesh.workers.experts import ExpertShard
from expertmesh.workers.grpc_server import start_expert_server
from expertmesh.workers.placement import ExpertPlacement
from vl_reference import CASES, TOL, max_diff, prompt, ref_greedy, ref_logits

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def gateway_engine(path, dispatcher) -> LLMEngine:
    cfg = ModelConfig.from_dir(path)
    with CheckpointReader(path) as reader:
        model = GatewayModel.load(reader, cfg, torch.float32)
    return LLMEngine(model, dispatcher, cfg, EngineConfig(), ImageSettings.from_dir(path))


def check_every_case(path, engine: LLMEngine) -> None:
    names = list(CASES)
    prompts, images = zip(*(prompt(path, n) for n in names))
    for name, got in zip(names, engine.score(prompts, images=images)):
        assert max_diff(got, ref_logits(path, name)) <= TOL, name
    outs = engine.generate(prompts, GREEDY, images=images)
    assert [o.token_ids for o in outs] == [ref_greedy(path, n, 12) for n in names]


def test_grpc_two_workers(vl_checkpoint):
    cfg = ModelConfig.from_dir(vl_checkpoint)
    placement = ExpertPlacement.contiguous(cfg.num_experts, 2, groups=2)
    servers: list[grpc.Server] = []
    addresses = []
    try:
        with CheckpointReader(vl_checkpoint) as reader:
            for w in range(2):
                shard = ExpertShard.load(reader, cfg, placement.experts_of(w), torch.float32)
                assert shard.weights and shard.vision_weights  # both modalities on each worker
                server, port = start_expert_server(shard, w)
                servers.append(server)
                addresses.append(f"127.0.0.1:{port}")
        engine = gateway_engine(vl_checkpoint, GrpcDispatcher(placement, addresses, 30.0))
        check_every_case(vl_checkpoint, engine)
        engine.close()
    finally:
        for s in servers:
            s.stop(0).wait()


@pytest.mark.slow
def test_collective_two_worker_processes(vl_checkpoint):
    from test_collective_transport import Workers

    cluster = Workers(vl_checkpoint, 2)
    try:
        engine = gateway_engine(vl_checkpoint, cluster.connect())
        check_every_case(vl_checkpoint, engine)
        engine.close()  # SHUTDOWN to every worker
        for p in cluster.procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        cluster.kill_all()

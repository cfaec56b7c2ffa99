"""The gRPC transport: expert servers in this process on 127.0.0.1, the engine talking to them.

Parity with transformers and with the in-process engine, the wire format, which rows a worker
sees, failure detection and recovery, and stale generated stubs.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from conftest import CONFIGS, prompts_of, reference_model
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.proto import expert_pb2, expert_pb2_grpc, generate
from expertmesh.router.dispatch import WorkerUnavailable
from expertmesh.router.engine import EngineConfig, LLMEngine
from expertmesh.router.grpc_dispatch import GrpcDispatcher
from expertmesh.router.model import GatewayModel
from expertmesh.router.sampling import SamplingParams
from expertmesh.workers.experts import ExpertShard
from expertmesh.workers.grpc_server import start_expert_server
from expertmesh.workers.placement import ExpertPlacement
from expertmesh.workers.wire import tensor_from_proto, tensor_to_proto

TOL = 1e-4
GREEDY = SamplingParams(max_tokens=32, temperature=0)
RAGGED = [3, 11, 30, 1]  # prompt lengths of the generate batch


class RecordingShard(ExpertShard):
    """An ExpertShard that remembers what each Forward brought it: (layer, x, expert_ids)."""

    def __init__(self, shard: ExpertShard):
        super().__init__(shard.cfg, shard.experts, shard.weights)
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def forward(self, layer, x, expert_ids, weights):
        self.calls.append((layer, x.clone(), expert_ids.clone()))
        return super().forward(layer, x, expert_ids, weights)


class Mesh:
    """Expert servers over one checkpoint's shards and a gRPC engine in front of them."""

    def __init__(self, path: Path, workers: int, cfg: EngineConfig, timeout_s: float):
        self.model_cfg = ModelConfig.from_dir(path)
        self.placement = ExpertPlacement.contiguous(self.model_cfg.num_experts, workers)
        dtype = cfg.torch_dtype(self.model_cfg)
        with CheckpointReader(path) as reader:
            model = GatewayModel.load(reader, self.model_cfg, dtype, cfg.device)
            self.shards = [
                RecordingShard(ExpertShard.load(reader, self.model_cfg, self.experts(w), dtype))
                for w in range(workers)
            ]
        self.servers: list[grpc.Server] = []
        addresses = [self.serve(w) for w in range(workers)]
        self.dispatcher = GrpcDispatcher(self.placement, addresses, timeout_s)
        self.engine = LLMEngine(model, self.dispatcher, self.model_cfg, cfg)

    def experts(self, w: int) -> list[int]:
        return self.placement.experts_of(w)

    def serve(self, w: int) -> str:
        """Start a new server for shard w on a free port; its address."""
        server, port = start_expert_server(self.shards[w], w)
        self.servers.append(server)
        return f"127.0.0.1:{port}"

    def close(self) -> None:
        self.dispatcher.close()
        for server in self.servers:
            server.stop(0).wait()


@pytest.fixture
def mesh(make_checkpoint):
    """mesh(config name, workers, EngineConfig, timeout_s) -> Mesh; all stopped afterwards."""
    made: list[Mesh] = []

    def make(name="top2of8-shared1", workers=2, cfg=None, timeout_s=30.0):
        path = make_checkpoint(**CONFIGS[name])
        made.append(Mesh(path, workers, cfg or EngineConfig(), timeout_s))
        return made[-1]

    yield make
    for m in made:
        m.close()


@functools.cache
def ref_greedy(path: Path, prompt: tuple[int, ...], n: int) -> list[int]:
    with torch.no_grad():
        out = reference_model(path).generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def tokens(engine: LLMEngine, prompts) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(prompts, GREEDY)]


# -- the wire ---------------------------------------------------------------------------------


def roundtrip(t: torch.Tensor) -> torch.Tensor:
    msg = expert_pb2.Tensor.FromString(tensor_to_proto(t).SerializeToString())
    return tensor_from_proto(msg)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # NaN != NaN as floats


def test_tensors_roundtrip_bit_exact():
    bf16 = torch.randn(37, 64).bfloat16()  # [n, H]
    bf16[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    bf16[1, 0] = torch.finfo(torch.bfloat16).tiny / 4  # subnormal
    ids = torch.tensor([[3, -1], [2**62, -(2**40)]])  # [n, k] int64
    for t in [bf16, ids, torch.randn(5, 3), torch.empty(0, 64), torch.empty(0, 8).bfloat16()]:
        got = roundtrip(t)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(bits(got), bits(t))
    assert torch.equal(bits(roundtrip(bf16.t())), bits(bf16.t()))  # non-contiguous input
    assert tensor_to_proto(bf16).dtype == "bfloat16"
    assert len(tensor_to_proto(bf16).data) == bf16.numel() * 2


def test_malformed_tensors_are_rejected():
    with pytest.raises(ValueError, match="bytes"):
        tensor_from_proto(expert_pb2.Tensor(data=b"\0" * 6, dtype="float32", shape=[2]))
    with pytest.raises(ValueError, match="dtype"):
        tensor_from_proto(expert_pb2.Tensor(data=b"", dtype="object", shape=[0]))


def test_generated_stubs_are_fresh():
    here = Path(generate.__file__).parent
    for name, text in generate.render().items():
        assert (here / name).read_text() == text, f"proto/{name} is stale: run proto/generate.py"


# -- parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, workers",
    [("top2of8-shared1", 1), ("top2of8-shared1", 2), ("top4of16-shared2-start2-every2", 3)],
)
def test_grpc_engine_matches_reference_and_local(make_checkpoint, mesh, name, workers):
    path = make_checkpoint(**CONFIGS[name])
    m = mesh(name, workers)
    vocab = m.model_cfg.vocab_size
    prompts = prompts_of([1, 7, 64], vocab, seed=workers)
    for prompt, got in zip(prompts, m.engine.score(prompts)):
        with torch.no_grad():
            want = reference_model(path)(torch.tensor([prompt])).logits[0].float()  # [L, V]
        assert (got - want).abs().max() <= TOL

    prompts = prompts_of(RAGGED, vocab, seed=7)
    got = tokens(m.engine, prompts)
    local = LLMEngine.from_checkpoint(path, num_shards=workers)
    assert got == tokens(local, prompts)
    assert got == [ref_greedy(path, tuple(p), GREEDY.max_tokens) for p in prompts]


def test_workers_receive_only_their_rows_in_model_dtype(mesh):
    m = mesh("top2of8-shared1", workers=3, cfg=EngineConfig(dtype="bfloat16"))
    prompts = prompts_of([5, 23], m.model_cfg.vocab_size, seed=1)
    m.engine.score(prompts)  # one forward over 28 tokens
    owner = m.placement.owner_tensor()  # [E]
    for layer, routed in zip(m.model_cfg.moe_layers, m.engine.model.routing()):  # [T, k]
        for w, shard in enumerate(m.shards):
            calls = [c for c in shard.calls if c[0] == layer]
            want_rows = int((owner[routed] == w).any(-1).sum())
            assert len(calls) == (1 if want_rows else 0)  # one exchange per worker per layer
            if not calls:
                continue
            _, x, ids = calls[0]  # x: [n, H]; ids: [n, k]
            assert x.dtype == torch.bfloat16 and x.shape == (want_rows, m.model_cfg.hidden_size)
            mine = torch.isin(ids, torch.tensor(m.experts(w)))  # [n, k]
            assert mine.any(-1).all()  # every row has one of this worker's experts
            assert ((ids == -1) | mine).all()  # and names no expert of another worker


def test_info_and_bad_layer(mesh):
    m = mesh("top2of8-shared1", workers=2)
    for w in range(2):
        info = m.dispatcher.info(w)
        assert info.shard_index == w and list(info.expert_ids) == m.experts(w)
        assert info.weight_bytes == m.shards[w].nbytes and info.pid > 0
    x = torch.zeros(1, m.model_cfg.hidden_size)  # [1, H]
    request = expert_pb2.ForwardRequest(
        layer=0, x=tensor_to_proto(x), expert_ids=tensor_to_proto(torch.zeros(1, 2).long())
    )
    with grpc.insecure_channel(m.dispatcher.addresses[0]) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(request, timeout=5)  # layer 0 is dense
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- failures ---------------------------------------------------------------------------------


def stop_worker_at(m: Mesh, worker: int, exchange: int) -> dict:
    """Stop `worker`'s server just before the first exchange >= `exchange` that includes it."""
    state = {"sends": 0, "stopped_at": None}
    send = m.dispatcher._send

    def tripwire(layer, parts):
        state["sends"] += 1
        if state["stopped_at"] is None and state["sends"] >= exchange and worker in parts:
            m.servers[worker].stop(0).wait()
            state["stopped_at"] = time.perf_counter()
        return send(layer, parts)

    m.dispatcher._send = tripwire
    return state


def test_dead_worker_without_recovery_fails_fast(mesh):
    m = mesh("top2of8-shared1", workers=2, timeout_s=30.0)
    prompts = prompts_of(RAGGED, m.model_cfg.vocab_size, seed=7)
    state = stop_worker_at(m, worker=1, exchange=40)  # a few decode steps in
    with pytest.raises(WorkerUnavailable, match=r"\[1\]"):
        m.engine.generate(prompts, GREEDY)
    assert state["stopped_at"] is not None
    assert time.perf_counter() - state["stopped_at"] < 5.0  # not the 30 s deadline


def test_dead_worker_is_restarted_and_the_layer_resent(mesh):
    m = mesh("top2of8-shared1", workers=2, timeout_s=30.0)
    prompts = prompts_of(RAGGED, m.model_cfg.vocab_size, seed=7)
    want = tokens(m.engine, prompts)

    failures = []

    def recover(failure):
        failures.append(failure.workers)
        for w in failure.workers:
            m.dispatcher.reconnect(w, m.serve(w))  # a new server on a new port

    m.dispatcher.recover = recover
    stop_worker_at(m, worker=1, exchange=40)
    assert tokens(m.engine, prompts) == want
    assert failures == [{1}]
    assert m.dispatcher.info(1).shard_index == 1


def test_hung_worker_is_cut_off_and_its_late_reply_never_read(mesh):
    """A worker that stops answering fails the exchange at the deadline (the watchdog cancels
    its stream); the next exchange opens a new stream, so the hung call's late reply is never
    taken for the next layer's."""
    m = mesh("top2of8-shared1", workers=2, timeout_s=1.0)
    prompts = prompts_of(RAGGED, m.model_cfg.vocab_size, seed=7)
    want = tokens(m.engine, prompts)
    shard, release = m.shards[1], threading.Event()
    forward, hung = shard.forward, []

    def hang_once(*args):
        if not hung:
            hung.append(time.perf_counter())
            release.wait(10)  # answers late, after the gateway gave up
        return forward(*args)

    shard.forward = hang_once
    failures = []

    def recover(failure):
        failures.append((failure.workers, failure.cause, time.perf_counter() - hung[0]))
        release.set()  # the late reply goes out on the cancelled stream

    m.dispatcher.recover = recover
    assert tokens(m.engine, prompts) == want
    [(workers, cause, after)] = failures
    assert workers == {1} and "DEADLINE_EXCEEDED" in cause
    assert 0.9 <= after < 5.0

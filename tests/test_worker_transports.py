"""The point-to-point transports (gRPC streams, TCP frames): expert servers in this process on
127.0.0.1, the engine talking to them.

For both: parity with transformers and with the in-process engine, which rows a worker sees,
failure detection and recovery. Then each one's wire: gRPC's tensors, stubs and status codes;
the TCP frames, malformed and refused ones included.
"""

from __future__ import annotations

import functools
import queue
import re
import socket
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
from expertmesh.router.tcp_dispatch import TcpDispatcher, split_address
from expertmesh.workers import frames
from expertmesh.workers.experts import ExpertShard
from expertmesh.workers.grpc_server import start_expert_server
from expertmesh.workers.placement import ExpertPlacement
from expertmesh.workers.tcp_server import ExpertTcpServer
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

    def start(self, layer, x, expert_ids, weights):  # the worker's path with the kernel's helper
        self.calls.append((layer, x.clone(), expert_ids.clone()))
        return super().start(layer, x, expert_ids, weights)


TRANSPORTS = ["grpc", "tcp"]
DISPATCHERS = {"grpc": GrpcDispatcher, "tcp": TcpDispatcher}


class Mesh:
    """Expert servers over one checkpoint's shards and an engine in front of them."""

    def __init__(
        self, path: Path, workers: int, cfg: EngineConfig, timeout_s: float, transport: str
    ):
        self.transport, self.path = transport, path
        self.model_cfg = ModelConfig.from_dir(path)
        self.placement = ExpertPlacement.contiguous(self.model_cfg.num_experts, workers)
        dtype = cfg.torch_dtype(self.model_cfg)
        with CheckpointReader(path) as reader:
            model = GatewayModel.load(reader, self.model_cfg, dtype, cfg.device)
            self.shards = [
                RecordingShard(ExpertShard.load(reader, self.model_cfg, self.experts(w), dtype))
                for w in range(workers)
            ]
        self.servers: dict[int, grpc.Server | ExpertTcpServer] = {}
        self.stopped: list = []
        addresses = [self.serve(w) for w in range(workers)]
        self.dispatcher = DISPATCHERS[transport](self.placement, addresses, timeout_s)
        self.engine = LLMEngine(model, self.dispatcher, self.model_cfg, cfg)

    def experts(self, w: int) -> list[int]:
        return self.placement.experts_of(w)

    def serve(self, w: int) -> str:
        """Start a new server for shard w on a free port; its address."""
        if self.transport == "grpc":
            server, port = start_expert_server(self.shards[w], w)
        else:
            server = ExpertTcpServer(self.shards[w], w)
            port = server.port
        self.servers[w] = server
        return f"127.0.0.1:{port}"

    def stop(self, w: int) -> None:
        """Stop shard w's server at once (its connections end)."""
        server = self.servers.pop(w)
        self.stopped.append(server)
        if isinstance(server, ExpertTcpServer):
            server.stop()
        else:
            server.stop(0).wait()

    def close(self) -> None:
        self.dispatcher.close()
        for w in list(self.servers):
            self.stop(w)


@pytest.fixture
def mesh(make_checkpoint):
    """mesh(config name, workers, EngineConfig, timeout_s, transport) -> Mesh; all stopped
    afterwards."""
    made: list[Mesh] = []

    def make(name="top2of8-shared1", workers=2, cfg=None, timeout_s=30.0, transport="grpc"):
        path = make_checkpoint(**CONFIGS[name])
        made.append(Mesh(path, workers, cfg or EngineConfig(), timeout_s, transport))
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


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "name, workers",
    [("top2of8-shared1", 1), ("top2of8-shared1", 2), ("top4of16-shared2-start2-every2", 3)],
)
def test_engine_matches_reference_and_local(make_checkpoint, mesh, name, workers, transport):
    path = make_checkpoint(**CONFIGS[name])
    m = mesh(name, workers, transport=transport)
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_workers_receive_only_their_rows_in_model_dtype(mesh, transport):
    m = mesh("top2of8-shared1", workers=3, cfg=EngineConfig(dtype="bfloat16"), transport=transport)
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


def test_grpc_info_and_bad_layer(mesh):
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


def forward_request(layer: int, x, ids, weights) -> expert_pb2.ForwardRequest:
    return expert_pb2.ForwardRequest(
        layer=layer,
        x=tensor_to_proto(x),  # [n, H]
        expert_ids=tensor_to_proto(ids),  # [n, k]
        weights=tensor_to_proto(weights),  # [n, k]
    )


def test_grpc_server_serves_grpcios_own_client_and_refuses_only_the_bad_call(mesh):
    """The worker's serving loop (grpcio's Cython layer) against grpcio's public client:
    Forward (unary) gives the shard's rows; ForwardStream answers in order on one call; an
    unknown method is UNIMPLEMENTED; bytes that are no ForwardRequest, a wire dtype that does
    not exist and a layer that is not MoE end their own call with INVALID_ARGUMENT, after
    the replies before them; the server goes on serving."""
    m = mesh("top2of8-shared1", workers=2)
    layers, hidden = m.model_cfg.moe_layers, m.model_cfg.hidden_size
    g = torch.Generator().manual_seed(3)
    mine = torch.tensor([[0, -1], [1, 2], [-1, 3]])  # experts of worker 0 (it holds 0..3)
    calls = [(layers[i % len(layers)], torch.randn(3, hidden, generator=g), mine,
              torch.rand(3, 2, generator=g)) for i in range(5)]  # fmt: skip
    with torch.inference_mode():
        want = [m.shards[0].forward(*c) for c in calls]
    service = "/expertmesh.expert.ExpertService/"
    with grpc.insecure_channel(m.dispatcher.addresses[0]) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        got = tensor_from_proto(stub.Forward(forward_request(*calls[0]), timeout=5).y)
        torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
        replies = stub.ForwardStream(iter([forward_request(*c) for c in calls]), timeout=5)
        for reply, w in zip(replies, want, strict=True):
            torch.testing.assert_close(tensor_from_proto(reply.y), w, rtol=1e-5, atol=1e-5)

        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(service + "Nope")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(service + "Forward")(b"\xff\xff\xff", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a ForwardRequest" in err.value.details()
        odd = forward_request(*calls[1])
        odd.x.dtype = "float99"
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(odd, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "float99" in err.value.details()

        dense = forward_request(0, *calls[0][1:])  # layer 0 is dense
        replies = stub.ForwardStream(iter([forward_request(*calls[0]), dense]), timeout=5)
        torch.testing.assert_close(
            tensor_from_proto(next(replies).y), want[0], rtol=1e-5, atol=1e-5
        )
        with pytest.raises(grpc.RpcError) as err:
            next(replies)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "layer 0 is not MoE" in err.value.details()
        assert stub.Info(expert_pb2.InfoRequest(), timeout=5).shard_index == 0
    prompts = prompts_of(RAGGED, m.model_cfg.vocab_size, seed=7)  # the engine is unaffected
    assert tokens(m.engine, prompts) == [ref_greedy(m.path, tuple(p), 32) for p in prompts]


def test_grpc_server_computes_what_arrived_together_as_one_batch(mesh):
    """Three gateways' streams to one worker: while a computation is under way, the requests
    that arrive meanwhile (two of one layer, one of another) wait in the server's queue and
    are then taken together: one computation per layer, each reply its own rows."""
    m = mesh("top2of8-shared1", workers=2)
    layers, hidden = m.model_cfg.moe_layers, m.model_cfg.hidden_size
    server = m.servers[0]
    g = torch.Generator().manual_seed(5)
    mine = torch.tensor([[0, -1], [1, 2]])  # [2, k]: experts of worker 0
    calls = [(layers[i], torch.randn(2, hidden, generator=g), mine, torch.rand(2, 2, generator=g))
             for i in (0, 0, 0, 1)]  # fmt: skip
    with torch.inference_mode():
        want = [m.shards[0].forward(*c) for c in calls]
    channels = [grpc.insecure_channel(m.dispatcher.addresses[0]) for _ in calls]
    try:
        queues = [queue.SimpleQueue() for _ in calls]
        replies = [
            expert_pb2_grpc.ExpertServiceStub(c).ForwardStream(iter(q.get, None), timeout=20)
            for c, q in zip(channels, queues, strict=True)
        ]
        before = server.combiner.stats.snapshot()
        entered, together = threading.Event(), server.combiner.compute_together

        def compute_together(*args):
            entered.set()
            return together(*args)

        server.combiner.compute_together = compute_together
        server.combiner._compute.acquire()  # a computation under way
        try:
            queues[0].put(forward_request(*calls[0]))  # the server's thread takes it and waits
            assert entered.wait(10)
            for i in (1, 2, 3):
                queues[i].put(forward_request(*calls[i]))
            time.sleep(1.0)  # they reach the server's queue meanwhile (loopback)
        finally:
            server.combiner._compute.release()
        for r, w in zip(replies, want, strict=True):
            torch.testing.assert_close(tensor_from_proto(next(r).y), w, rtol=1e-5, atol=1e-5)
        after = server.combiner.stats.snapshot()
        # the first alone, then the two of its layer together and the other layer's
        assert after["exchanges"] - before["exchanges"] == 4
        assert after["batches"] - before["batches"] == 3
        for q in queues:
            q.put(None)
    finally:
        for c in channels:
            c.close()


def test_grpc_server_refuses_calls_past_its_limit_and_stops_with_a_grace(mesh):
    m = mesh("top2of8-shared1", workers=2)
    server, port = start_expert_server(m.shards[0], 0, max_calls=1)
    layer, hidden = m.model_cfg.moe_layers[0], m.model_cfg.hidden_size
    request = forward_request(
        layer, torch.randn(1, hidden), torch.tensor([[0, 1]]), torch.rand(1, 2)
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            requests = queue.SimpleQueue()
            requests.put(request)
            stream = stub.ForwardStream(iter(requests.get, None), timeout=20)
            next(stream)  # the one call it takes is open
            with pytest.raises(grpc.RpcError) as err:
                stub.Info(expert_pb2.InfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many calls (1)" in err.value.details()
            stopped = server.stop(grace=0.5)  # the open stream may finish within the grace
            requests.put(request)
            next(stream)
            assert stopped.wait(10)  # then it is cut off and the server is gone
            with pytest.raises(grpc.RpcError):
                next(stream)
    finally:
        server.stop(0).wait(10)


def test_grpc_stream_reads_a_reply_ahead_when_sent_twice(mesh):
    """gRPC allows one message in flight each way per call: a second send before the first
    reply is read reads that reply first (kept for the next receive), so order holds."""
    from expertmesh.router.grpc_dispatch import _Stream

    m = mesh("top2of8-shared1", workers=2)
    layer, hidden = m.model_cfg.moe_layers[0], m.model_cfg.hidden_size
    calls = [(layer, torch.randn(1, hidden), torch.tensor([[i, -1]]), torch.ones(1, 2))
             for i in range(3)]  # fmt: skip
    with torch.inference_mode():
        want = [m.shards[0].forward(*c) for c in calls]
    with grpc.insecure_channel(m.dispatcher.addresses[0]) as channel:
        stream = _Stream(channel)
        for c in calls:
            stream.send(forward_request(*c))
        for w in want:
            torch.testing.assert_close(tensor_from_proto(stream.receive(5).y), w)
        stream.close()


# -- failures ---------------------------------------------------------------------------------


def stop_worker_at(m: Mesh, worker: int, exchange: int) -> dict:
    """Stop `worker`'s server just before the first exchange >= `exchange` that includes it."""
    state = {"sends": 0, "stopped_at": None}
    send = m.dispatcher._send

    def tripwire(layer, parts):
        state["sends"] += 1
        if state["stopped_at"] is None and state["sends"] >= exchange and worker in parts:
            m.stop(worker)
            state["stopped_at"] = time.perf_counter()
        return send(layer, parts)

    m.dispatcher._send = tripwire
    return state


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dead_worker_without_recovery_fails_fast(mesh, transport):
    m = mesh("top2of8-shared1", workers=2, timeout_s=30.0, transport=transport)
    prompts = prompts_of(RAGGED, m.model_cfg.vocab_size, seed=7)
    state = stop_worker_at(m, worker=1, exchange=40)  # a few decode steps in
    with pytest.raises(WorkerUnavailable, match=r"\[1\]"):
        m.engine.generate(prompts, GREEDY)
    assert state["stopped_at"] is not None
    assert time.perf_counter() - state["stopped_at"] < 5.0  # not the 30 s deadline


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dead_worker_is_restarted_and_the_layer_resent(mesh, transport):
    m = mesh("top2of8-shared1", workers=2, timeout_s=30.0, transport=transport)
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
    if transport == "grpc":
        assert m.dispatcher.info(1).shard_index == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hung_worker_is_cut_off_and_its_late_reply_never_read(mesh, transport):
    """A worker that stops answering fails the exchange at the deadline (gRPC: the watchdog
    cancels its stream; TCP: the socket's timeout, and the connection is closed); the next
    exchange opens a new stream or connection, so the hung call's late reply is never taken
    for the next layer's."""
    m = mesh("top2of8-shared1", workers=2, timeout_s=1.0, transport=transport)
    prompts = prompts_of(RAGGED, m.model_cfg.vocab_size, seed=7)
    want = tokens(m.engine, prompts)
    shard, release = m.shards[1], threading.Event()
    hung = []

    def hang_once(compute):  # the shard's forward, or start (with the kernel's helper)
        def call(*args):
            if not hung:
                hung.append(time.perf_counter())
                release.wait(10)  # answers late, after the gateway gave up
            return compute(*args)

        return call

    shard.forward, shard.start = hang_once(shard.forward), hang_once(shard.start)
    failures = []

    def recover(failure):
        failures.append((failure.workers, failure.cause, time.perf_counter() - hung[0]))
        release.set()  # the late reply goes out on the cancelled stream

    m.dispatcher.recover = recover
    assert tokens(m.engine, prompts) == want
    [(workers, cause, after)] = failures
    assert workers == {1} and "DEADLINE_EXCEEDED" in cause
    assert 0.9 <= after < 5.0


# -- the TCP frames ---------------------------------------------------------------------------


def frame_through(send, *args) -> frames.Frame:
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=send, args=(a, *args))  # a big frame fills the buffer
        sender.start()
        frame = frames.read_frame(b)
        sender.join()
        return frame


def test_frames_roundtrip_bit_exact_at_odd_sizes():
    x = torch.randn(3, 5).bfloat16()  # [n, H]: 30 bytes, so ids start after padding
    x[0, :3] = torch.tensor([float("nan"), float("-inf"), -0.0])
    ids = torch.tensor([[3, -1], [0, 7], [-1, 2]])  # [n, k]
    for weights in [torch.rand(3, 2), torch.rand(3, 2).bfloat16()]:
        f = frame_through(frames.send_request, 5, x, ids, weights)
        assert (f.kind, f.layer, f.n, f.k, f.hidden) == (frames.Kind.REQUEST, 5, 3, 2, 5)
        gx, gids, gw = frames.request_tensors(f)
        assert torch.equal(bits(gx), bits(x)) and torch.equal(gids, ids)
        assert gw.dtype == weights.dtype and torch.equal(bits(gw), bits(weights))
    y = torch.randn(3, 5)
    f = frame_through(frames.send_reply, 5, y)
    assert f.kind == frames.Kind.REPLY and torch.equal(frames.reply_tensor(f), y)
    empty = frame_through(frames.send_request, 1, x[:0], ids[:0], torch.rand(0, 2))
    assert [t.shape for t in frames.request_tensors(empty)] == [(0, 5), (0, 2), (0, 2)]
    big = torch.randn(300, 512)  # [n, H]: over the size sent in one piece
    f = frame_through(frames.send_request, 2, big, torch.zeros(300, 4).long(), torch.rand(300, 4))
    assert torch.equal(frames.request_tensors(f)[0], big)
    f = frame_through(frames.send_error, 4, "no such layer")
    assert f.kind == frames.Kind.ERROR and frames.error_text(f) == "no such layer"


def header(**kw) -> bytes:
    v = dict(magic=frames.MAGIC, kind=1, dt=0, wdt=0, layer=1, n=1, k=1, h=4, length=28)
    v.update(kw)
    return frames.HEADER.pack(*v.values())


@pytest.mark.parametrize(
    "raw, error",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(8), "not a frame"),
        (header(kind=9), "bad frame header"),
        (header(dt=7), "bad frame header"),
        (header(n=-1), "bad frame header"),
        (header(length=2**40), "bad frame header"),  # refused before allocating it
        (header(length=31), "needs 28 bytes"),  # x 16, ids 8 (at 16), weights 4 (at 24)
        (header(kind=2, length=15), "needs 16 bytes"),
    ],
    ids=["http", "kind", "dtype", "negative", "huge", "request-length", "reply-length"],
)
def test_malformed_frames_are_rejected(raw, error):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        with pytest.raises(frames.FrameError, match=error):
            frames.read_frame(b)


def test_a_stream_ending_inside_a_frame_is_an_error_and_between_frames_is_not():
    a, b = socket.socketpair()
    with b:
        a.sendall(header() + bytes(10))  # 10 of the payload's 28 bytes
        a.close()
        with pytest.raises(EOFError):
            frames.read_frame(b)
    a, b = socket.socketpair()
    with b:
        a.close()
        assert frames.read_frame(b) is None


def request(sock, layer, x, ids, weights=None) -> frames.Frame:
    weights = torch.rand(ids.shape) if weights is None else weights
    frames.send_request(sock, layer, x, ids, weights)
    return frames.read_frame(sock)


def test_tcp_server_refuses_bad_requests_and_keeps_serving(mesh):
    m = mesh("top2of8-shared1", workers=2, transport="tcp")
    hidden, layer = m.model_cfg.hidden_size, m.model_cfg.moe_layers[0]
    x = torch.randn(2, hidden)  # [n, H]
    mine = torch.tensor([[0, -1], [1, 2]])  # experts of worker 0 (it holds 0..3)
    with socket.create_connection(split_address(m.dispatcher.addresses[0])) as sock:
        refused = [
            (request(sock, 0, x, mine), "layer 0 is not MoE"),
            (request(sock, layer, x, torch.tensor([[5, -1], [0, 1]])), r"experts \[5\]"),
            (request(sock, layer, x, torch.tensor([[99, -1], [0, 1]])), "out of range"),
            (request(sock, layer, torch.randn(2, hidden + 1), mine), "width"),
        ]
        for f, message in refused:
            assert f.kind == frames.Kind.ERROR and re.search(message, frames.error_text(f))
        weights = torch.rand(2, 2)
        f = request(sock, layer, x, mine, weights)  # the same connection still serves
        assert f.kind == frames.Kind.REPLY and f.layer == layer
        want = m.shards[0].forward(layer, x, mine, weights)
        assert torch.allclose(frames.reply_tensor(f), want, atol=1e-6)
        sock.sendall(b"\x00" * 64)  # garbage: an error, then the connection is closed
        f = frames.read_frame(sock)
        assert f.kind == frames.Kind.ERROR and "malformed" in frames.error_text(f)
        try:  # closed: an end of stream, or a reset (the rest of the garbage was unread)
            assert frames.read_frame(sock) is None
        except ConnectionResetError:
            pass
    prompts = prompts_of(RAGGED, m.model_cfg.vocab_size, seed=7)  # the engine is unaffected
    assert tokens(m.engine, prompts) == [ref_greedy(m.path, tuple(p), 32) for p in prompts]


def test_tcp_refusal_fails_the_exchange_with_the_workers_message(mesh):
    m = mesh("top2of8-shared1", workers=2, transport="tcp")
    with pytest.raises(WorkerUnavailable, match="not MoE"):
        m.dispatcher(
            0, torch.randn(1, m.model_cfg.hidden_size), torch.tensor([[0, 5]]), torch.rand(1, 2)
        )


def test_tcp_server_refuses_connections_past_its_limit(mesh):
    m = mesh("top2of8-shared1", workers=2, transport="tcp")
    server = ExpertTcpServer(m.shards[0], 0, max_connections=1)
    layer, x = m.model_cfg.moe_layers[0], torch.randn(1, m.model_cfg.hidden_size)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as first:
            assert request(first, layer, x, torch.tensor([[0, -1]])).kind == frames.Kind.REPLY
            with socket.create_connection(("127.0.0.1", server.port)) as second:
                f = frames.read_frame(second)
                assert f.kind == frames.Kind.ERROR and "too many" in frames.error_text(f)
            assert request(first, layer, x, torch.tensor([[1, 2]])).kind == frames.Kind.REPLY
    finally:
        server.stop()

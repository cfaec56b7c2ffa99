"""The gRPC transport, worker side: serve one ExpertShard as `expertmesh.expert.ExpertService`.

One thread serves every call: it waits on the server's completion queue (grpcio's Cython
layer), computes the rows that arrived and starts the replies, with no other Python thread in
the path of a message. grpcio's public server hands every message from its polling thread to
a handler thread of a pool and back (the reply waits for the poller to report it sent):
on 2 cores that was ~70 us of a ~490 us round trip to two workers, and most of a worker's
gRPC CPU (`scripts/bench_transport_overhead.py`). That layer is not public API; grpcio is
pinned in pyproject.toml, and every transport test runs through this class.

Calls of several gateways that are ready together are computed together: everything the queue
holds when the thread looks is taken at once, and the requests of one layer go through the
worker's `Combiner` as one batch (the point of M:N). A request the shard refuses (a layer
that is not MoE, a malformed tensor) ends its call with INVALID_ARGUMENT, as a failed
computation ends it with UNKNOWN; other calls go on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch
from expertmesh.proto import expert_pb2
from google.protobuf.message import DecodeError
from grpc._cython import cygrpc

from .combine import Combiner
from .experts import ExpertShard
from .wire import SERVER_OPTIONS, tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)

_SERVICE = "/expertmesh.expert.ExpertService/"
_STREAM, _UNARY, _INFO = (f"{_SERVICE}{m}".encode() for m in ("ForwardStream", "Forward", "Info"))
_NEW_CALL, _SHUTDOWN = "new call", "shutdown"  # tags of the server's own events
_OK = cygrpc.StatusCode.ok
_TIMEOUT = cygrpc.CompletionType.queue_timeout
_POLL_S = 1.0  # the thread looks at the clock this often while idle (a stop that grace ended)


class _Refused(Exception):
    """A request the worker will not compute: the call ends with INVALID_ARGUMENT."""


@dataclass(eq=False)
class _Call:
    """A call being served, and how many of its batches are not completed yet."""

    call: cygrpc.Call
    method: bytes
    due: int = 0
    metadata_sent: bool = False
    statused: bool = False  # its status is sent: nothing more goes out


@dataclass
class _Request:
    """A Forward or ForwardStream request that parsed, waiting to be computed."""

    call: _Call
    layer: int
    x: torch.Tensor  # [n, H]
    ids: torch.Tensor  # [n, k]
    weights: torch.Tensor  # [n, k]


class ExpertGrpcServer:
    """Serves `shard` on host:port (0: a free port, see `.port`) until `stop()`.

    Several gateways may call at once; past `max_calls` open calls a new one is refused with
    RESOURCE_EXHAUSTED (each gateway keeps one `ForwardStream` open, plus a short `Info`).
    """

    def __init__(
        self,
        shard: ExpertShard,
        shard_index: int,
        host: str = "127.0.0.1",
        port: int = 0,
        combiner: Combiner | None = None,
        max_calls: int = 64,
    ):
        self.shard, self.shard_index = shard, shard_index
        self.combiner = combiner or Combiner(shard)
        self.max_calls = max_calls
        self._cq = cygrpc.CompletionQueue()
        self._server = cygrpc.Server(tuple(SERVER_OPTIONS), False)
        self._server.register_completion_queue(self._cq)
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self._server.add_http2_port(bind.encode())
        if self.port == 0:
            raise RuntimeError(f"expert server could not bind {bind}")
        self._calls: set[_Call] = set()
        self._due = 0  # the server's own events not completed (new-call requests, shutdown)
        self._lock = threading.Lock()
        self._stopping = False
        self._cancel_at: float | None = None  # when a graceful stop cancels what is left
        self._stopped = threading.Event()
        self._server.start()
        self._request_call()
        self._thread = threading.Thread(target=self._serve, name="grpc-expert-server", daemon=True)
        self._thread.start()
        log.info("expert shard %d serving on %s:%d", shard_index, host, self.port)

    # -- the serving thread ---------------------------------------------------------------

    def _serve(self) -> None:
        while not self._finished():
            event = self._cq.poll(time.time() + _POLL_S)
            if event.completion_type == _TIMEOUT:
                self._cancel_if_grace_ended()
                continue
            events = [event]
            while (more := self._cq.poll(0)).completion_type != _TIMEOUT:
                events.append(more)  # everything ready now is answered together
            requests = []
            for e in events:
                try:
                    requests += self._on_event(e)
                except Exception:  # a bug: that call may go unanswered (the gateway's deadline
                    log.exception("handling a gRPC event failed")  # cuts it), the rest go on
            self._compute(requests)
        self._server.destroy()
        self._stopped.set()

    def _finished(self) -> bool:
        with self._lock:
            return self._stopping and not self._due and not self._calls

    def _on_event(self, event) -> list[_Request]:
        tag = event.tag
        if tag is _NEW_CALL:
            with self._lock:
                self._due -= 1
            if event.success:
                self._request_call()
                self._on_call(_Call(event.call, event.call_details.method))
            return []
        if tag is _SHUTDOWN:
            with self._lock:
                self._due -= 1
            return []
        kind, c = tag
        c.due -= 1
        requests = []
        if kind == "message" and event.success and not c.statused:
            message = next(
                op.message()
                for op in event.batch_operations
                if op.type() == cygrpc.OperationType.receive_message
            )
            requests = self._on_message(c, message)
        if not c.due:
            with self._lock:
                self._calls.discard(c)
        return requests

    def _on_call(self, c: _Call) -> None:
        with self._lock:
            full = len(self._calls) >= self.max_calls
            self._calls.add(c)
        self._start(c, (cygrpc.ReceiveCloseOnServerOperation(0),), "closed")
        if not c.due:  # gone already
            with self._lock:
                self._calls.discard(c)
            return
        if full:
            log.warning("refusing a call: %d open", self.max_calls)
            self._end(c, cygrpc.StatusCode.resource_exhausted, f"too many calls ({self.max_calls})")
        elif c.method == _STREAM:
            c.metadata_sent = True
            self._start(c, (_metadata(), cygrpc.ReceiveMessageOperation(0)), "message")
        elif c.method in (_UNARY, _INFO):
            self._start(c, (cygrpc.ReceiveMessageOperation(0),), "message")
        else:
            self._end(c, cygrpc.StatusCode.unimplemented, "Method not found!")

    def _on_message(self, c: _Call, message: bytes | None) -> list[_Request]:
        if message is None:  # the client closed its side: a stream ends well, a unary call not
            if c.method == _STREAM:
                self._end(c, _OK, "")
            else:
                self._end(c, cygrpc.StatusCode.internal, "a request message is required")
            return []
        if c.method == _INFO:
            reply = expert_pb2.InfoReply(
                shard_index=self.shard_index,
                expert_ids=self.shard.experts,
                weight_bytes=self.shard.nbytes,
                pid=os.getpid(),
            )
            self._reply(c, reply.SerializeToString())
            return []
        try:
            return [self._parse(c, message)]
        except _Refused as e:
            self._end(c, cygrpc.StatusCode.invalid_argument, str(e))
            return []

    def _parse(self, c: _Call, message: bytes) -> _Request:
        try:
            request = expert_pb2.ForwardRequest.FromString(message)
        except DecodeError as e:
            raise _Refused(f"not a ForwardRequest: {e}") from None
        if request.layer not in self.shard.weights:
            raise _Refused(f"layer {request.layer} is not MoE")
        try:
            return _Request(
                c,
                request.layer,
                tensor_from_proto(request.x),  # [n, H]
                tensor_from_proto(request.expert_ids),  # [n, k]
                tensor_from_proto(request.weights),  # [n, k]
            )
        except ValueError as e:
            raise _Refused(str(e)) from None

    def _compute(self, requests: list[_Request]) -> None:
        """The requests of each layer as one computation; a reply (or an error) to each."""
        for layer in dict.fromkeys(r.layer for r in requests):
            group = [r for r in requests if r.layer == layer]
            parts = [(r.x, r.ids, r.weights) for r in group]
            try:
                with torch.inference_mode():
                    ys = self.combiner.compute_together(layer, parts)  # [n, H] each
                replies = [expert_pb2.ForwardReply(y=tensor_to_proto(y)) for y in ys]
            except Exception as e:  # the gateway sees only the message: keep the traceback here
                rows = sum(len(r.x) for r in group)
                log.exception("layer %d: computing %d rows failed", layer, rows)
                for r in group:
                    self._end(r.call, cygrpc.StatusCode.unknown, f"{type(e).__name__}: {e}")
                continue
            for r, reply in zip(group, replies, strict=True):
                self._reply(r.call, reply.SerializeToString())

    # -- starting batches -------------------------------------------------------------------

    def _start(self, c: _Call, operations: tuple, kind: str) -> None:
        try:
            c.call.start_server_batch(operations, (kind, c))
        except Exception as e:  # the call is gone (cancelled under us): nothing to answer
            log.debug("a batch on a finished call: %s", e)
            return
        c.due += 1

    def _reply(self, c: _Call, reply: bytes) -> None:
        """Send `reply`: on a stream, then read the next request; a unary call ends with it."""
        if c.statused:
            return
        if c.method == _STREAM:
            ops = (cygrpc.SendMessageOperation(reply, 0), cygrpc.ReceiveMessageOperation(0))
            self._start(c, ops, "message")
        else:
            self._finish(c, _OK, b"", cygrpc.SendMessageOperation(reply, 0))

    def _end(self, c: _Call, code, details: str) -> None:
        self._finish(c, code, details.encode())

    def _finish(self, c: _Call, code, details: bytes, *messages) -> None:
        """Send the call's status (after `messages`); nothing goes out on it after that."""
        if c.statused:
            return
        c.statused = True
        ops = () if c.metadata_sent else (_metadata(),)
        c.metadata_sent = True
        status = cygrpc.SendStatusFromServerOperation(None, code, details, 0)
        self._start(c, (*ops, *messages, status), "sent")

    def _request_call(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._server.request_call(self._cq, self._cq, _NEW_CALL)
            self._due += 1

    # -- stopping -------------------------------------------------------------------------

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stop taking calls; cancel the open ones at once, or after `grace` seconds. The
        event is set once the server is gone (as `grpc.Server.stop`)."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._server.shutdown(self._cq, _SHUTDOWN)
                self._due += 1
            if grace:
                self._cancel_at = time.monotonic() + grace
            else:
                self._server.cancel_all_calls()
        return self._stopped

    def _cancel_if_grace_ended(self) -> None:
        with self._lock:
            if self._cancel_at is not None and time.monotonic() >= self._cancel_at:
                self._cancel_at = None
                self._server.cancel_all_calls()


def _metadata():
    return cygrpc.SendInitialMetadataOperation(None, 0)


def start_expert_server(
    shard: ExpertShard,
    shard_index: int,
    host: str = "127.0.0.1",
    port: int = 0,
    max_calls: int = 64,
    combiner: Combiner | None = None,
) -> tuple[ExpertGrpcServer, int]:
    """Serve `shard` on host:port (0 picks a free port); the started server and its port."""
    server = ExpertGrpcServer(shard, shard_index, host, port, combiner, max_calls)
    return server, server.port

"""The gRPC transport, gateway side: one open ForwardStream call per worker, all in flight at once.

Each worker gets one long-lived bidirectional call (`ForwardStream`); an exchange is one
request message on it and one reply back, in order. A message on an open stream costs about a
third of a new unary call here (~130 against ~300 us on loopback, 2 cores), and a decode step
makes one exchange per MoE layer per worker.

The call is driven on the engine's own thread, through grpcio's Cython layer (a "segregated"
call: its own completion queue, polled by whoever waits on it; grpcio's blocking unary calls
work this way). grpcio's public streaming API runs a stream on two helper threads (one feeds
the request iterator to the call, one polls the channel's completion queue and wakes the
reader), and every message crossed both: on 2 cores, a round trip to two workers was 720-830
us and 670-790 us of the gateway's CPU that way, against 480-490 us and ~310 us here
(`scripts/bench_transport_overhead.py`). That layer is not public API; grpcio is pinned in
pyproject.toml, and every transport test runs through this class.

`_send` puts every worker's request on its stream and returns; `_receive` reads one reply per
worker. A worker that dies ends its stream with an error (UNAVAILABLE); one that hangs is cut
off after `timeout_s` by a watchdog that cancels its stream. Either way the worker is part of
one `WorkerFailure` for the exchange, and its stream is dropped: the next exchange opens a new
one (after `reconnect`, once a restarted worker reports its new address). The replies of the
workers that did answer are still read, so no stream is left with a stale reply in it.
"""

from __future__ import annotations

import collections
import threading
import time

import grpc
import torch
from expertmesh.proto import expert_pb2, expert_pb2_grpc
from expertmesh.workers.placement import ExpertPlacement
from expertmesh.workers.wire import CHANNEL_OPTIONS, tensor_from_proto, tensor_to_proto
from grpc._cython import cygrpc

from .dispatch import AddressedDispatcher, Pending, WorkerRows

_METHOD = b"/expertmesh.expert.ExpertService/ForwardStream"
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
_MESSAGE, _STATUS = "message", "status"  # tags of the call's batches (the others: None)


class _Failed(Exception):
    """The call ended with an error status (or was cancelled)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class _Ended(Exception):
    """A stream ended without a reply."""


class _Stream:
    """One ForwardStream call: requests go out in order, replies are read in order.

    gRPC allows one message being sent and one being read per call at a time, so each request
    goes out in one batch with the read of its reply. Sending while an earlier reply is still
    unread first reads that reply into `_early` (the dispatcher never does: it reads every
    reply before the next send).
    """

    def __init__(self, channel: grpc.Channel):
        batches = (
            ((cygrpc.SendInitialMetadataOperation(None, 0),), None),
            ((cygrpc.ReceiveInitialMetadataOperation(0),), None),
            ((cygrpc.ReceiveStatusOnClientOperation(0),), _STATUS),
        )
        self.call = channel._channel.segregated_call(  # noqa: SLF001 (see the module docstring)
            cygrpc.PropagationConstants.GRPC_PROPAGATE_DEFAULTS,
            _METHOD, None, None, None, None, batches,
        )  # fmt: skip
        self._due = len(batches)  # batches not completed; at 0 the call's queue is gone
        self._lock = threading.Lock()  # one reader of the queue at a time (close() may be another)
        self._in_flight = False  # a request whose reply is not read yet
        self._early: collections.deque[bytes] = collections.deque()  # replies read ahead
        self.status: _Failed | _Ended | None = None  # how the call ended, once it has
        self._broken: Exception | None = None  # why the last send could not go out
        self.deadline: float | None = None  # while a reply is awaited: when to give up
        self.timed_out = False

    def send(self, request: expert_pb2.ForwardRequest) -> None:
        """Queue `request`; a call that has failed raises at the next `receive` instead."""
        try:
            if self._in_flight:
                self._early.append(self._read())
            ops = (cygrpc.SendMessageOperation(request.SerializeToString(), 0),
                   cygrpc.ReceiveMessageOperation(0))  # fmt: skip
            if not self.call.operate(ops, _MESSAGE):  # the call has ended
                raise self.status or _Ended("the worker ended the stream")
        except (_Failed, _Ended) as e:
            self._broken = e
            return
        self._due += 1
        self._in_flight = True

    def receive(self, timeout_s: float) -> expert_pb2.ForwardReply:
        """The next reply; raises _Failed if the call failed or was cut off, _Ended if the
        worker closed it."""
        if self._early:
            return expert_pb2.ForwardReply.FromString(self._early.popleft())
        if self._broken is not None:
            raise self._broken
        if not self._in_flight:
            raise _Ended("no request is waiting for a reply")
        self.deadline = time.monotonic() + timeout_s
        try:
            return expert_pb2.ForwardReply.FromString(self._read())
        finally:
            self.deadline = None

    def _read(self) -> bytes:
        """Wait for the batch of the request in flight; its reply."""
        while True:
            event = self._next_event()
            if event.tag is _MESSAGE:
                self._in_flight = False
                reply = event.batch_operations[1].message()
                if reply is not None:
                    return reply
                while self.status is None and self._due:  # why: the status follows
                    self._next_event()
                raise self.status or _Ended("the worker ended the stream")

    def _next_event(self):
        with self._lock:
            if not self._due:
                raise self.status or _Ended("the call has ended")
            event = self.call.next_event()
            self._due -= 1
        if event.tag is _STATUS:
            op = event.batch_operations[0]
            code = _STATUS_CODES.get(op.code(), grpc.StatusCode.UNKNOWN)
            if code is grpc.StatusCode.OK:
                self.status = _Ended("the worker ended the stream")
            else:
                details = op.details()
                if isinstance(details, bytes):
                    details = details.decode(errors="replace")
                self.status = _Failed(code, details)
        return event

    def cancel(self) -> None:
        """Fail the call (from any thread); a read waiting on it returns with CANCELLED."""
        self.call.cancel(cygrpc.StatusCode.cancelled, "cancelled by the gateway")

    def close(self) -> None:
        """Cancel the call and take its last events, which frees its completion queue."""
        self.cancel()
        while self._due:
            try:
                self._next_event()
            except (_Failed, _Ended):
                break


class GrpcDispatcher(AddressedDispatcher):
    """Expert shards behind `ExpertService` servers; worker w listens on addresses[w]."""

    def __init__(self, placement: ExpertPlacement, addresses: list[str], timeout_s: float = 30.0):
        super().__init__(placement, addresses, timeout_s)
        self._channels: list[grpc.Channel] = [self._channel(a) for a in self.addresses]
        self._stubs = [expert_pb2_grpc.ExpertServiceStub(c) for c in self._channels]
        self._streams: dict[int, _Stream] = {}
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="grpc-deadlines", daemon=True)
        self._watchdog.start()

    @staticmethod
    def _channel(address: str) -> grpc.Channel:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)

    def _stream(self, w: int) -> _Stream:
        if w not in self._streams:
            self._streams[w] = _Stream(self._channels[w])
        return self._streams[w]

    def _drop(self, w: int) -> None:
        stream = self._streams.pop(w, None)
        if stream is not None:
            stream.close()

    def _send(self, layer: int, parts: dict[int, WorkerRows]) -> list[int]:
        for w, part in parts.items():
            request = expert_pb2.ForwardRequest(
                layer=layer,
                x=tensor_to_proto(part.x),  # [n, H]
                expert_ids=tensor_to_proto(part.expert_ids),  # [n, k]
                weights=tensor_to_proto(part.weights),  # [n, k]
            )
            self._stream(w).send(request)
        return list(parts)

    def _receive(self, pending: Pending) -> dict[int, torch.Tensor]:
        """A reply from every worker of the exchange; one WorkerFailure naming all that failed."""
        results, errors = {}, {}
        for w in pending.handle:
            stream = self._streams.get(w)
            try:
                if stream is None:  # dropped since the send (a failure of another exchange)
                    raise _Ended("the stream was closed")
                results[w] = tensor_from_proto(stream.receive(self.timeout_s).y)  # [n, H]
            except _Failed as e:
                code = "DEADLINE_EXCEEDED" if stream.timed_out else e.code.name
                errors[w] = f"{code}: {e.details}"
            except _Ended as e:
                errors[w] = str(e)
        self._fail(errors)
        return results

    def _watch(self) -> None:
        """Cancel the stream of a worker whose reply is overdue (it hung): its read fails."""
        period = min(0.1, self.timeout_s / 10)
        while not self._closed.wait(period):
            now = time.monotonic()
            for stream in list(self._streams.values()):
                deadline = stream.deadline
                if deadline is not None and now > deadline and not stream.timed_out:
                    stream.timed_out = True
                    stream.cancel()

    def reconnect(self, worker: int, address: str) -> None:
        """Talk to `worker` at `address` from now on (a restarted worker has a new port)."""
        self._drop(worker)
        old = self._channels[worker]
        self.addresses[worker] = address
        self._channels[worker] = self._channel(address)
        self._stubs[worker] = expert_pb2_grpc.ExpertServiceStub(self._channels[worker])
        old.close()

    def info(
        self, worker: int, timeout_s: float = 5.0, wait_for_ready: bool = False
    ) -> expert_pb2.InfoReply:
        """The worker's shard index, experts, weight bytes and pid; raises grpc.RpcError if down.

        With `wait_for_ready`, waits up to `timeout_s` for a worker that is still starting.
        """
        return self._stubs[worker].Info(
            expert_pb2.InfoRequest(), timeout=timeout_s, wait_for_ready=wait_for_ready
        )

    def close(self) -> None:
        self._closed.set()
        for w in list(self._streams):
            self._drop(w)
        for channel in self._channels:
            channel.close()

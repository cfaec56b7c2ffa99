"""The tcp transport, gateway side: one TCP connection per worker, frames sent and read inline.

The thread that runs the step writes each worker's request frame (`workers/frames.py`) and
later reads its reply itself: no other thread is woken per exchange, which is where gRPC's
time went at decode sizes (see frames.py for the measurements).

Failures: a worker that dies resets or ends its connection, and the read fails at once; one
that hangs is cut off when its reply is `timeout_s` late (the socket's timeout). Either way the
connection is closed and dropped, so a late reply can never be read as the next exchange's; the
next exchange connects anew (after `reconnect`, once a restarted worker reports its new
address). The other workers' replies are still read. An ERROR frame (the worker refused the
request) fails the exchange too, with the worker's message.
"""

from __future__ import annotations

import socket

import torch
from expertmesh.workers import frames
from expertmesh.workers.placement import ExpertPlacement

from .dispatch import AddressedDispatcher, Pending, WorkerRows


def split_address(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class TcpDispatcher(AddressedDispatcher):
    """Expert shards behind `ExpertTcpServer`s; worker w listens on addresses[w]."""

    def __init__(
        self,
        placement: ExpertPlacement,
        addresses: list[str],
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
    ):
        super().__init__(placement, addresses, timeout_s)
        self.connect_timeout_s = connect_timeout_s
        self._socks: dict[int, socket.socket] = {}

    def _sock(self, w: int) -> socket.socket:
        if w not in self._socks:
            sock = socket.create_connection(
                split_address(self.addresses[w]), timeout=self.connect_timeout_s
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout_s)
            self._socks[w] = sock
        return self._socks[w]

    def _drop(self, w: int) -> None:
        sock = self._socks.pop(w, None)
        if sock is not None:
            sock.close()

    def _send(self, layer: int, parts: dict[int, WorkerRows]) -> dict[int, str | None]:
        """Each worker's request on its connection; the handle says which sends failed."""
        sent: dict[int, str | None] = {}
        for w, part in parts.items():
            try:
                frames.send_request(self._sock(w), layer, part.x, part.expert_ids, part.weights)
                sent[w] = None
            except OSError as e:  # refused, reset, timed out: the worker is down or stuck
                self._drop(w)
                sent[w] = f"send failed: {e!r}"
        return sent

    def _receive(self, pending: Pending) -> dict[int, torch.Tensor]:
        """A reply from every worker of the exchange; one WorkerFailure naming all that failed."""
        results, errors = {}, {}
        for w, failed in pending.handle.items():
            if failed is not None:
                errors[w] = failed
                continue
            sock = self._socks.get(w)
            try:
                if sock is None:  # dropped since the send (a failure of another exchange)
                    raise EOFError("the connection was closed")
                frame = frames.read_frame(sock)
                if frame is None:
                    raise EOFError("the worker closed the connection")
                if frame.kind == frames.Kind.ERROR:
                    raise frames.FrameError(f"the worker refused: {frames.error_text(frame)}")
                if frame.kind != frames.Kind.REPLY or frame.layer != pending.layer:
                    raise frames.FrameError(f"unexpected {frame.kind.name} for layer {frame.layer}")
                results[w] = frames.reply_tensor(frame)  # [n, H]
            except TimeoutError:
                errors[w] = f"DEADLINE_EXCEEDED: no reply within {self.timeout_s:g} s"
            except (OSError, EOFError, frames.FrameError) as e:
                errors[w] = str(e) or repr(e)
        self._fail(errors)
        return results

    def reconnect(self, worker: int, address: str) -> None:
        """Talk to `worker` at `address` from now on (a restarted worker has a new port)."""
        self._drop(worker)
        self.addresses[worker] = address

    def close(self) -> None:
        for w in list(self._socks):
            self._drop(w)

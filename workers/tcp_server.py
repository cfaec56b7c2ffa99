"""The tcp transport, worker side: serve one ExpertShard over plain TCP frames (`frames.py`).

One connection per gateway, one thread per connection: it reads a request, computes it
through the worker's `Combiner` (so exchanges of several gateways for one layer are computed
together, as with gRPC) and writes the reply. A request the shard refuses (a layer that is not
MoE, experts it does not hold, a wrong width) gets an ERROR frame and the connection goes on; a
frame that does not parse closes the connection, since nothing after it can be trusted.
"""

from __future__ import annotations

import logging
import socket
import threading

import torch

from . import frames
from .combine import Combiner
from .experts import ExpertShard

log = logging.getLogger(__name__)


class ExpertTcpServer:
    """Listens on host:port (0: a free port, see `.port`) until `stop()`."""

    def __init__(
        self,
        shard: ExpertShard,
        shard_index: int,
        host: str = "127.0.0.1",
        port: int = 0,
        combiner: Combiner | None = None,
        max_connections: int = 64,
    ):
        self.shard, self.shard_index = shard, shard_index
        self.max_connections = max_connections  # one per gateway; as the gRPC server's pool
        self.combiner = combiner or Combiner(shard)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=64)
        self.port = self._listener.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._accepting = threading.Thread(target=self._accept, name="tcp-accept", daemon=True)
        self._accepting.start()
        log.info("expert shard %d serving tcp frames on %s:%d", shard_index, host, self.port)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopped:
                    conn.close()
                    return
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                log.warning("refusing a tcp connection: %d open", self.max_connections)
                try:
                    frames.send_error(conn, -1, f"too many connections ({self.max_connections})")
                except OSError:
                    pass
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="tcp-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while (frame := frames.read_frame(conn)) is not None:
                self._answer(conn, frame)
        except (frames.FrameError, EOFError) as e:
            log.warning("closing a tcp connection: %s", e)
            try:
                frames.send_error(conn, -1, f"malformed frame: {e}")
            except OSError:
                pass
        except OSError:  # reset by the gateway, or stop()
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _answer(self, conn: socket.socket, frame: frames.Frame) -> None:
        layer = frame.layer
        try:
            if frame.kind != frames.Kind.REQUEST:
                raise ValueError(f"expected a REQUEST frame, got {frame.kind.name}")
            if layer not in self.shard.weights:
                raise ValueError(f"layer {layer} is not MoE")
            if frame.hidden != self.shard.cfg.hidden_size:
                raise ValueError(
                    f"rows of width {frame.hidden}, the model's is {self.shard.cfg.hidden_size}"
                )
            x, ids, weights = frames.request_tensors(frame)  # [n, H], [n, k], [n, k]
            if ((ids < -1) | (ids >= self.shard.cfg.num_experts)).any():
                raise ValueError("expert ids out of range")
            with torch.inference_mode():
                y = self.combiner.forward(layer, x, ids, weights)  # [n, H]
        except Exception as e:  # refused or failed: say so, keep the connection
            log.warning("tcp request for layer %d failed: %s", layer, e)
            frames.send_error(conn, layer, f"{type(e).__name__}: {e}")
            return
        frames.send_reply(conn, layer, y)

    def stop(self) -> None:
        """Stop listening and drop every connection (gateways see their streams end)."""
        with self._lock:
            self._stopped = True
            conns = list(self._conns)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

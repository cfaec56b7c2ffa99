"""The gRPC transport, worker side: serve one ExpertShard as `expertmesh.expert.ExpertService`."""

from __future__ import annotations

import logging
import os
from concurrent import futures

import grpc
import torch
from expertmesh.proto import expert_pb2, expert_pb2_grpc

from .combine import Combiner
from .experts import ExpertShard
from .wire import SERVER_OPTIONS, tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    """Runs the shard's grouped expert FFN on the rows each Forward call brings."""

    def __init__(self, shard: ExpertShard, shard_index: int, combiner: Combiner | None = None):
        self.shard = shard
        self.shard_index = shard_index
        self.combiner = combiner or Combiner(shard)  # concurrent calls: computed together

    def Forward(self, request: expert_pb2.ForwardRequest, context) -> expert_pb2.ForwardReply:
        return self._forward(request, context)

    def ForwardStream(self, requests, context):
        """One gateway's exchanges, in order, on one call: a reply per request."""
        for request in requests:
            yield self._forward(request, context)

    def _forward(self, request: expert_pb2.ForwardRequest, context) -> expert_pb2.ForwardReply:
        if request.layer not in self.shard.weights:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"layer {request.layer} is not MoE")
        try:
            x = tensor_from_proto(request.x)  # [n, H]
            ids = tensor_from_proto(request.expert_ids)  # [n, k]
            weights = tensor_from_proto(request.weights)  # [n, k]
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            with torch.inference_mode():
                y = self.combiner.forward(request.layer, x, ids, weights)  # [n, H]
        except Exception:  # the gateway sees only the message: keep the traceback here
            log.exception("layer %d: computing %d rows failed", request.layer, x.shape[0])
            raise
        return expert_pb2.ForwardReply(y=tensor_to_proto(y))

    def Info(self, request: expert_pb2.InfoRequest, context) -> expert_pb2.InfoReply:
        return expert_pb2.InfoReply(
            shard_index=self.shard_index,
            expert_ids=self.shard.experts,
            weight_bytes=self.shard.nbytes,
            pid=os.getpid(),
        )


def start_expert_server(
    shard: ExpertShard,
    shard_index: int,
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 64,
    combiner: Combiner | None = None,
) -> tuple[grpc.Server, int]:
    """Serve `shard` on host:port (0 picks a free port); returns the started server and its port.

    Several gateways may call at once; `max_workers` bounds the concurrent calls. Each
    gateway's `ForwardStream` holds a thread while it is open (idle between exchanges), so the
    pool is sized for many gateways and their reconnections, with room left for `Info`.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=SERVER_OPTIONS
    )
    expert_pb2_grpc.add_ExpertServiceServicer_to_server(
        ExpertServicer(shard, shard_index, combiner), server
    )
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(bind)
    if bound == 0:
        raise RuntimeError(f"expert server could not bind {bind}")
    server.start()
    log.info("expert shard %d serving on %s:%d", shard_index, host, bound)
    return server, bound

"""The gRPC transport, gateway side: one Forward call per worker per MoE layer, all in flight at once.

`_send` starts every worker's call (`stub.Forward.future`) and returns; `_receive` waits for all
of them. Any gRPC error of a worker (UNAVAILABLE when it died, DEADLINE_EXCEEDED when it hung,
CANCELLED, or an error status it returned) makes that worker part of one `WorkerFailure` for
the exchange. `reconnect` swaps in a new channel once a restarted worker reports its address.
"""

from __future__ import annotations

import grpc
import torch
from expertmesh.proto import expert_pb2, expert_pb2_grpc
from expertmesh.workers.placement import ExpertPlacement
from expertmesh.workers.wire import CHANNEL_OPTIONS, tensor_from_proto, tensor_to_proto

from .dispatch import Dispatcher, Pending, WorkerFailure, WorkerRows


class GrpcDispatcher(Dispatcher):
    """Expert shards behind `ExpertService` servers; worker w listens on addresses[w]."""

    def __init__(self, placement: ExpertPlacement, addresses: list[str], timeout_s: float = 30.0):
        super().__init__(placement)
        if len(addresses) != placement.num_shards:
            raise ValueError(
                f"{len(addresses)} worker addresses for {placement.num_shards} expert shards"
            )
        self.timeout_s = timeout_s
        self.addresses = list(addresses)
        self._channels: list[grpc.Channel] = [self._channel(a) for a in self.addresses]
        self._stubs = [expert_pb2_grpc.ExpertServiceStub(c) for c in self._channels]

    @staticmethod
    def _channel(address: str) -> grpc.Channel:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)

    def _send(self, layer: int, parts: dict[int, WorkerRows]) -> dict[int, grpc.Future]:
        calls = {}
        for w, part in parts.items():
            request = expert_pb2.ForwardRequest(
                layer=layer,
                x=tensor_to_proto(part.x),  # [n, H]
                expert_ids=tensor_to_proto(part.expert_ids),  # [n, k]
                weights=tensor_to_proto(part.weights),  # [n, k]
            )
            calls[w] = self._stubs[w].Forward.future(request, timeout=self.timeout_s)
        return calls

    def _receive(self, pending: Pending) -> dict[int, torch.Tensor]:
        """Wait for every call of the exchange; raise one WorkerFailure naming all that failed."""
        results, errors = {}, {}
        for w, call in pending.handle.items():
            try:
                results[w] = tensor_from_proto(call.result().y)  # [n, H]
            except grpc.RpcError as e:
                errors[w] = f"{e.code().name}: {e.details()}"
            except grpc.FutureCancelledError:
                errors[w] = "call cancelled"
        if errors:
            cause = "; ".join(f"worker {w} ({self.addresses[w]}) {e}" for w, e in errors.items())
            raise WorkerFailure(set(errors), cause)
        return results

    def reconnect(self, worker: int, address: str) -> None:
        """Talk to `worker` at `address` from now on (a restarted worker has a new port)."""
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
        for channel in self._channels:
            channel.close()

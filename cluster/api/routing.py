"""Routing calls to gateway replicas: least-loaded for new requests, pinned for their streams.

Serve's request router picks a replica per call; the multiplexed event stream needs more: the
ingress submits a request to whichever gateway is least loaded, then must reach *that* replica
again for its stream of events (one per ingress replica and gateway replica) and for aborts.
`GatewayRouter` is the gateway deployment's router:

- a call whose `session_id` names a replica (`handle.options(session_id=replica_id)`) goes to
  that replica, or fails with `GatewayGone` at once when it is no longer one;
- any other call goes to the replica with the fewest ongoing requests (Serve's probes and
  cache), leaving out replicas this ingress found hung (`suspect`) while others remain.

A gateway holds one ongoing call per request it runs (`Gateway.run`), so "ongoing requests" is
its real load, for this choice and for Serve's autoscaling alike.

The router lives in the ingress's process (one per handle); `known_replicas()` is what the
routers of this process have been told by Serve, so the ingress can open a stream to every
gateway replica, idle ones included, and notice a hang before it routes a request there.
"""

from __future__ import annotations

import importlib
import time
import weakref

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

SUSPECT_S = 60.0  # how long a replica found hung stays out of the choice for new requests

_suspects: dict[str, float] = {}  # replica id -> until when
_routers: weakref.WeakSet = weakref.WeakSet()


class GatewayGone(RuntimeError):
    """A pinned call named a gateway replica that Serve no longer runs."""


def suspect(replica_id: str, seconds: float = SUSPECT_S) -> None:
    """Leave `replica_id` out of the choice for new requests for a while (it hung or died)."""
    _suspects[replica_id] = time.monotonic() + seconds


def suspected(replica_id: str) -> bool:
    until = _suspects.get(replica_id)
    if until is None:
        return False
    if until < time.monotonic():
        del _suspects[replica_id]
        return False
    return True


def known_replicas() -> set[str]:
    """Gateway replicas Serve runs now, as the routers of this process know them."""
    return {rid.unique_id for router in list(_routers) for rid in router.curr_replicas}


def _this_module():
    """This module as the process imported it. Serve pickles a router's module by value, so
    the router's own globals are a copy; the state shared with the ingress lives here."""
    return importlib.import_module(__name__)


class GatewayRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        _this_module()._routers.add(self)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        # when no answer comes, Serve retries: after a pause, not in a tight loop
        pending_request.routing_context.should_backoff = True
        pin = pending_request.metadata.session_id
        if pin:
            match = [r for r in candidate_replicas if r.replica_id.unique_id == pin]
            if match:
                return [match]
            if not pending_request.future.done():
                pending_request.future.set_exception(GatewayGone(f"gateway {pin} is gone"))
            # a non-empty answer lets Serve's routing loop see the request is done and stop
            return [candidate_replicas[:1]]
        here = _this_module()
        live = [r for r in candidate_replicas if not here.suspected(r.replica_id.unique_id)]
        return [live or candidate_replicas]

"""The typed boundary between the HTTP ingress and a gateway: the calls the ingress may make.

Requests are submitted to a channel; each ingress replica holds one channel per gateway
replica, a long-lived stream that carries the `TokenEvent`s of all of its requests there, a
step's worth per item. Errors travel as events with an `ErrorKind`; the ingress maps kinds to
HTTP statuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, TypedDict

from expertmesh.ernie.image import ImageInputs
from expertmesh.router.events import TokenEvent
from expertmesh.router.sampling import SamplingParams


class Health(TypedDict):
    ready: bool  # engine running and every worker answering
    engine: bool
    workers: bool
    strategy: str | None  # the placement group's strategy, as Ray placed it
    requests: int  # requests this gateway has accepted since it started
    node_id: str  # the Ray node it runs on


class ModelInfo(TypedDict):
    vocab_size: int
    max_model_len: int


class GatewayAPI(Protocol):
    async def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        channel_id: str,
        images: ImageInputs | None = None,
    ) -> TokenEvent | None:
        """Queue a request whose events go to `channel_id`; an error event if it is refused.
        images (VL): preprocessed, one per image placeholder of the prompt, in order."""

    def run(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        channel_id: str,
        images: ImageInputs | None = None,
        resume_ids: list[int] = (),
    ) -> AsyncIterator[dict]:
        """`submit` as a call held open while the request runs (the load Serve sees): first
        {"replica": id, "refusal": event or None}. resume_ids: output tokens it already has
        (it moves here from a gateway that failed). Cancelling it aborts the request."""

    def channel(self, channel_id: str) -> AsyncIterator[list[TokenEvent]]:
        """The events of every request submitted to `channel_id`, a batch per item; an empty
        batch when there has been nothing to send for a second (the gateway is alive)."""

    def abort(self, request_id: str) -> None: ...

    def drain(self, message: str) -> None:
        """Refuse new requests and end every open one with an error event."""

    async def health(self) -> Health: ...

    def stats(self) -> dict:
        """{"replica": id, "running": n, "waiting": n}"""

    def expert_counts(self) -> dict:
        """Tokens routed to each expert: {"layers": [layer ids], "counts": [[per expert]]}."""

    def model_info(self) -> ModelInfo: ...

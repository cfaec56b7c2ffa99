"""The dispatcher interface: scatter token rows to the shards that own their experts, gather back.

One class per transport. Each MoE layer sends every worker, at most once, the rows of the
tokens routed to at least one of its experts, with their (expert id, weight) pairs; the worker
returns one pre-summed row per token. `dispatch` may return before results arrive, so a
caller can overlap work; `combine` waits and adds the workers' rows.

Failures: a transport raises `WorkerFailure` from `_receive` when a worker died or hung. If a
`recover` hook is set (the cluster sets one that waits for Ray to restart the worker and then
reconnects the transport), `combine` calls it and re-sends the same rows: all request state
lives on the gateway, so a lost exchange is simply repeated. A hook that gives up raises
`WorkerUnavailable`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from expertmesh.workers import fused_moe
from expertmesh.workers.experts import Done, ExpertShard
from expertmesh.workers.placement import ExpertPlacement, shards_of_slots


@dataclass
class WorkerRows:
    """What one worker receives for one MoE layer."""

    rows: torch.Tensor  # [n] index into the layer's T tokens
    x: torch.Tensor  # [n, H] in the model dtype
    expert_ids: torch.Tensor  # [n, k] global expert ids; -1 where the expert is elsewhere
    weights: torch.Tensor  # [n, k] routing weights (0 where the expert is elsewhere)


@dataclass
class Pending:
    """An exchange in flight: what was sent and a transport-specific handle to the answer."""

    layer: int
    num_tokens: int
    parts: dict[int, WorkerRows]
    handle: Any
    started: float = 0.0  # perf_counter() when the exchange was dispatched


class WorkerFailure(RuntimeError):
    """Workers died, hung or dropped their connection during an exchange."""

    def __init__(self, workers: set[int], cause: str):
        super().__init__(f"expert workers {sorted(workers)} failed: {cause}")
        self.workers = set(workers)
        self.cause = cause


class WorkerUnavailable(RuntimeError):
    """Workers did not come back within the recovery time; the step cannot finish."""


def split_by_worker(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    shard_of: torch.Tensor,
    workers: list[int] | None = None,
) -> dict[int, WorkerRows]:
    """Group a layer's token rows by the worker that holds their experts.

    x: [T, H]; expert_ids, weights: [T, k]; shard_of: [T, k] the worker each (token, slot)
    goes to (`shards_of_slots`: the expert's owner, or one of its copies); workers: those
    that appear in shard_of, when the caller knows them already.
    """
    parts = {}
    for w in torch.unique(shard_of).tolist() if workers is None else workers:
        mine = shard_of == w  # [T, k]
        rows = mine.any(-1).nonzero().squeeze(-1)  # [n]
        m = mine[rows]
        parts[w] = WorkerRows(
            rows=rows,
            x=x[rows],
            expert_ids=torch.where(m, expert_ids[rows], -1),
            weights=torch.where(m, weights[rows], 0),
        )
    return parts


def split_small(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    copies: list[list[int]],
    num_shards: int,
) -> tuple[dict[int, WorkerRows], list[int]]:
    """`shards_of_slots` + `split_by_worker` for a few rows on CPU, in Python: the same parts,
    and the (token, slot) pairs per shard, at ~30 us instead of ~130 (the tensor path is some
    25 small torch ops, in every MoE layer of a decode step).

    copies: the shards of each expert (`ExpertPlacement.copies`); token t of an expert with c
    copies goes to copy t % c, as in `shards_of_slots`."""
    pairs = [0] * num_shards
    rows: dict[int, list[int]] = {}
    ids_of: dict[int, list[list[int]]] = {}
    weights_of: dict[int, list[list[float]]] = {}
    for t, (ids_t, ws_t) in enumerate(zip(expert_ids.tolist(), weights.tolist(), strict=True)):
        shard = [copies[e][t % len(copies[e])] for e in ids_t]
        for w in dict.fromkeys(shard):  # each shard of this token once, in slot order
            rows.setdefault(w, []).append(t)
            ids_of.setdefault(w, []).append([e if s == w else -1 for e, s in zip(ids_t, shard)])
            weights_of.setdefault(w, []).append([v if s == w else 0.0 for v, s in zip(ws_t, shard)])
        for s in shard:
            pairs[s] += 1
    parts = {}
    for w in sorted(rows):
        r = torch.tensor(rows[w], dtype=torch.int64)  # [n]
        parts[w] = WorkerRows(
            rows=r,
            x=x if len(rows[w]) == x.shape[0] else x[r],  # [n, H]
            expert_ids=torch.tensor(ids_of[w], dtype=expert_ids.dtype),  # [n, k]
            weights=torch.tensor(weights_of[w], dtype=weights.dtype),  # [n, k]
        )
    return parts, pairs


def add_results(pending: Pending, results: dict[int, torch.Tensor], like: torch.Tensor):
    """Sum each worker's pre-summed rows into one [T, H] tensor."""
    if len(pending.parts) == 1:
        (w, part), n = next(iter(pending.parts.items())), pending.num_tokens
        if part.rows.shape[0] == n:  # rows are distinct and sorted: all T tokens, in order
            return results[w].to(like.device, like.dtype)
    out = torch.zeros(pending.num_tokens, like.shape[-1], dtype=like.dtype, device=like.device)
    for w, part in pending.parts.items():
        out.index_add_(0, part.rows.to(out.device), results[w].to(out.device, out.dtype))
    return out


class ExchangeLoad:
    """What the exchanges sent each worker: rows (tokens) and (token, expert) pairs, summed,
    and the busiest worker's, summed over exchanges (a layer waits for its busiest worker);
    and the exchanges' time from dispatch until combine had the answers."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.seconds = 0.0
        self.exchanges = 0
        self.rows = [0] * num_workers
        self.pairs = [0] * num_workers
        self.max_rows = 0  # sum over exchanges of the most rows any worker got
        self.max_pairs = 0

    def add(self, rows: list[int], pairs: list[int]) -> None:
        self.exchanges += 1
        for w in range(self.num_workers):
            self.rows[w] += rows[w]
            self.pairs[w] += pairs[w]
        self.max_rows += max(rows)
        self.max_pairs += max(pairs)

    def snapshot(self) -> dict:
        """Totals and, per exchange, the busiest worker over the mean worker (1.0: even)."""

        def ratio(most: int, total: list[int]) -> float:
            return most * self.num_workers / sum(total) if sum(total) else 1.0

        return {
            "seconds": self.seconds,
            "exchanges": self.exchanges,
            "rows": list(self.rows),
            "pairs": list(self.pairs),
            "max_rows": self.max_rows,
            "max_pairs": self.max_pairs,
            "rows_max_over_mean": ratio(self.max_rows, self.rows),
            "pairs_max_over_mean": ratio(self.max_pairs, self.pairs),
        }


class Dispatcher(ABC):
    """Moves one MoE layer's routed rows to the expert shards and back."""

    max_recoveries = 3  # recover-and-resend rounds per exchange before giving up
    small_rows = 8  # up to this many tokens on CPU, a layer's rows are split in Python

    def __init__(self, placement: ExpertPlacement):
        self._route_by(placement)
        self.load = ExchangeLoad(placement.num_shards)
        self.recover: Callable[[WorkerFailure], None] | None = None

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Route by `placement` from the next exchange on. Call it between exchanges (the
        engine loop does, between two steps), once every shard holds its experts."""
        old, new = self.placement, placement
        if (old.num_shards, old.num_experts) != (new.num_shards, new.num_experts):
            raise ValueError("a new placement must have the same shards and experts")
        self._route_by(placement)

    def _route_by(self, placement: ExpertPlacement) -> None:
        self.placement = placement
        self._table, self._count = placement.copy_table()  # [E, C], [E]
        self._copies = [list(c) for c in placement.copies]  # for split_small
        holders = {s for c in placement.copies for s in c}
        self._sole = holders.pop() if len(holders) == 1 else None  # one shard holds everything

    def dispatch(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> Pending:
        """Send the rows; may return before the answers arrive."""
        started, n = time.perf_counter(), self.placement.num_shards
        if self._sole is not None and x.shape[0]:  # every row goes there whole: no split
            rows = torch.arange(x.shape[0], device=x.device)  # [T]
            parts = {self._sole: WorkerRows(rows, x, expert_ids, weights)}
            pairs = [expert_ids.numel() if w == self._sole else 0 for w in range(n)]
        elif 0 < x.shape[0] <= self.small_rows and expert_ids.device.type == "cpu":
            parts, pairs = split_small(x, expert_ids, weights, self._copies, n)
        else:
            device = expert_ids.device
            if self._table.device != device:
                self._table, self._count = self._table.to(device), self._count.to(device)
            shard_of = shards_of_slots(expert_ids, self._table, self._count)  # [T, k]
            pairs = torch.bincount(shard_of.flatten(), minlength=n).tolist()
            used = [w for w in range(n) if pairs[w]]
            parts = split_by_worker(x, expert_ids, weights, shard_of, used)
        if x.shape[0]:
            self.load.add([len(parts[w].rows) if w in parts else 0 for w in range(n)], pairs)
        return Pending(layer, x.shape[0], parts, self._send(layer, parts), started)

    def combine(self, pending: Pending, like: torch.Tensor) -> torch.Tensor:
        """Wait for the answers and sum them: [T, H]. Recovers and re-sends on failure."""
        for attempt in range(self.max_recoveries + 1):
            try:
                out = add_results(pending, self._receive(pending), like)
                self.load.seconds += time.perf_counter() - pending.started
                return out
            except WorkerFailure as failure:
                if self.recover is None or attempt == self.max_recoveries:
                    raise WorkerUnavailable(str(failure)) from failure
                self.recover(failure)  # blocks until the workers are back, or raises
                pending.handle = self._send(pending.layer, pending.parts)
        raise AssertionError("unreachable")

    def __call__(self, layer, x, expert_ids, weights) -> torch.Tensor:
        return self.combine(self.dispatch(layer, x, expert_ids, weights), x)

    @abstractmethod
    def _send(self, layer: int, parts: dict[int, WorkerRows]) -> Any: ...

    @abstractmethod
    def _receive(self, pending: Pending) -> dict[int, torch.Tensor]: ...

    def close(self) -> None:
        """Release connections; the in-process dispatcher has none."""


class AddressedDispatcher(Dispatcher):
    """Workers reached over the network, worker w at addresses[w] (gRPC, TCP): a failed
    worker's connection is dropped, and one WorkerFailure names every worker that failed."""

    def __init__(self, placement: ExpertPlacement, addresses: list[str], timeout_s: float):
        super().__init__(placement)
        if len(addresses) != placement.num_shards:
            raise ValueError(
                f"{len(addresses)} worker addresses for {placement.num_shards} expert shards"
            )
        self.timeout_s = timeout_s
        self.addresses = list(addresses)

    @abstractmethod
    def _drop(self, w: int) -> None:
        """Close worker w's connection; the next exchange opens a new one."""

    def _fail(self, errors: dict[int, str]) -> None:
        """Drop the connections of the workers in `errors` and raise for them, if any."""
        for w in errors:
            self._drop(w)
        if errors:
            cause = "; ".join(f"worker {w} ({self.addresses[w]}) {e}" for w, e in errors.items())
            raise WorkerFailure(set(errors), cause)


class LocalDispatcher(Dispatcher):
    """All shards live in this process: the exchange is a function call.

    With `overlap` (default: `fused_moe.helper_thread()`, a process that may use a second
    core) the fused kernel starts a layer of at least `overlap_rows` tokens on its helper
    thread at dispatch, while the caller computes the shared experts, and joins in on what is
    left at combine. Every layer, one row too: at one stream over HTTP the inter-token latency
    was 3-17% lower with it than with 8 rows as the threshold, in 6 of 6 alternating pairs of
    fresh servers (seventh session, after the native decode attention; the sixth session had
    seen no difference, the second core also runs the HTTP side)."""

    overlap_rows = 1

    def __init__(
        self, placement: ExpertPlacement, shards: list[ExpertShard], overlap: bool | None = None
    ):
        super().__init__(placement)
        self.shards = shards
        self.overlap = fused_moe.helper_thread() if overlap is None else overlap

    def _send(self, layer: int, parts: dict[int, WorkerRows]) -> dict:
        def run(shard: ExpertShard, p: WorkerRows):
            if self.overlap and p.x.shape[0] >= self.overlap_rows:
                return shard.start(layer, p.x, p.expert_ids, p.weights)
            return Done(shard.forward(layer, p.x, p.expert_ids, p.weights))

        return {w: run(self.shards[w], p) for w, p in parts.items()}

    def _receive(self, pending: Pending) -> dict[int, torch.Tensor]:
        return {w: started.result() for w, started in pending.handle.items()}


def time_exchange(dispatcher: Dispatcher, model_cfg, rows: int, repeats: int, dtype) -> float:
    """Median seconds of one MoE-layer exchange of `rows` tokens with random routing."""
    import statistics

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, model_cfg.hidden_size, generator=g).to(dtype)  # [rows, H]
    probs = torch.randn(rows, model_cfg.num_experts, generator=g).softmax(-1)
    weights, ids = probs.topk(model_cfg.top_k, dim=-1)  # [rows, k]
    layer = model_cfg.moe_layers[0]
    dispatcher(layer, x, ids, weights)  # warm-up
    times = []
    for _ in range(max(repeats, 20)):
        t0 = time.perf_counter()
        dispatcher(layer, x, ids, weights)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

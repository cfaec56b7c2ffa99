"""Counters of a worker's exchanges: calls served, expert computations, token rows, and the
seconds those computations took.

Rows per computation is the worker-side batch size: with M gateways sharing the workers it is
what tells whether the experts see the combined batch (`expertmesh bench serve` reports it);
exchanges per computation > 1 means concurrent exchanges were computed together.
"""

from __future__ import annotations

import threading


class ExchangeStats:
    def __init__(self):
        self._lock = threading.Lock()
        self.exchanges = 0  # calls served (one per gateway per MoE layer per step)
        self.batches = 0  # expert computations (several exchanges may share one)
        self.rows = 0  # token rows computed
        self.compute_s = 0.0  # time in the expert computations

    def add(self, rows: int, exchanges: int = 1, seconds: float = 0.0) -> None:
        """One computation of `rows` rows that served `exchanges` calls in `seconds`."""
        with self._lock:
            self.exchanges += exchanges
            self.batches += 1
            self.rows += rows
            self.compute_s += seconds

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "exchanges": self.exchanges,
                "batches": self.batches,
                "rows": self.rows,
                "compute_s": self.compute_s,
            }

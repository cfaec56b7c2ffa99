"""Counters of a worker's exchanges: calls served, expert computations, token rows.

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

    def add(self, rows: int, exchanges: int = 1) -> None:
        """One computation of `rows` rows that served `exchanges` calls."""
        with self._lock:
            self.exchanges += exchanges
            self.batches += 1
            self.rows += rows

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"exchanges": self.exchanges, "batches": self.batches, "rows": self.rows}

"""`serve --pin-cpus`: cores of their own for the engines, the rest for everything else.

Why: a decode step is a chain of short matmuls, and on a small machine every other process of
the server (the HTTP proxy, the ingress, Serve's controller, Ray's raylet and GCS) runs on the
same cores and slows it: at one stream on 2 cores the HTTP inter-token latency was ~22 ms
against a ~12-15 ms step in-process. Pinning the gateway to one core and everything else to
the other (by hand) gave 16 ms; vLLM does the same for itself (it binds its OpenMP threads
and keeps a core for its front end).

The plan gives each compute process (each gateway replica, and each expert worker unless the
experts are in-process) a block of cores from the top, sets its torch threads to the block's
size, and leaves the lowest cores to every other process. A thread of the server applies it
to the processes of its own Ray (its descendants), and again as processes come and go.
Linux only; a machine with too few cores for a block each plus one is left unpinned.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)
COMPUTE = ("ray::ServeReplica:expertmesh:Gateway", "ray::ExpertWorker")  # process titles


@dataclass(frozen=True)
class Plan:
    blocks: list[list[int]]  # cores of each compute process, one block each
    rest: list[int]  # cores of every other process

    @property
    def threads(self) -> int:
        return len(self.blocks[0])


def make_plan(cpus: list[int], compute: int) -> Plan | None:
    """Blocks of equal size from the highest cores for `compute` processes, at least one core
    left for the rest; None when the cores do not allow it."""
    cpus = sorted(cpus)
    if compute < 1 or len(cpus) < compute + 1:
        return None
    per = (len(cpus) - 1) // compute
    top = cpus[len(cpus) - compute * per :]
    blocks = [top[i * per : (i + 1) * per] for i in range(compute)]
    return Plan(blocks, cpus[: len(cpus) - compute * per])


def pin(pid: int, cores: list[int]) -> None:
    """Every thread of `pid` onto `cores` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError, OSError):
            pass


class Pinner:
    """Keeps the server's processes on the plan: compute processes on blocks of their own
    (kept while they live; a new one takes a free block), all others on the rest."""

    def __init__(self, plan: Plan, period_s: float = 2.0):
        self.plan, self.period_s = plan, period_s
        self.owner: dict[int, int] = {}  # compute pid -> its block
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pin-cpus", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.apply()
            except Exception:
                log.exception("pinning failed")
            self._stop.wait(self.period_s)

    def apply(self) -> None:
        procs = {}
        for p in psutil.Process().children(recursive=True):
            try:
                procs[p.pid] = (p.cmdline() or [""])[0]
            except psutil.Error:
                continue
        self.owner = {pid: b for pid, b in self.owner.items() if pid in procs}
        for pid, title in sorted(procs.items()):
            if title.startswith(COMPUTE) and pid not in self.owner:
                free = sorted(set(range(len(self.plan.blocks))) - set(self.owner.values()))
                if free:
                    self.owner[pid] = free[0]
                    log.info(
                        "pinned %s (pid %d) to cores %s", title, pid, self.plan.blocks[free[0]]
                    )
        for pid in procs:
            block = self.owner.get(pid)
            pin(pid, self.plan.blocks[block] if block is not None else self.plan.rest)

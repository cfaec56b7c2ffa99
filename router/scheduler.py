"""Continuous (iteration-level) batching over a paged KV cache. Plain Python, no model.

Every step the scheduler decides, for each sequence it runs, how many of its not-yet-cached
tokens go through the model: the one new token of a decoding sequence, or a chunk of a
prompt. Sequences join and leave between steps. A sequence reserves the KV blocks for its
whole length (prompt + max_tokens) when admitted, so a running sequence never waits for
memory and nothing is ever preempted.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: str
    token_ids: list[int]  # prompt, then generated tokens
    max_tokens: int
    num_prompt: int = -1
    num_computed: int = 0  # tokens whose k/v are in the cache
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    arrival: int = 0

    def __post_init__(self) -> None:
        if self.num_prompt < 0:
            self.num_prompt = len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def max_len(self) -> int:
        return self.num_prompt + self.max_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int  # KV blocks in the cache
    block_size: int = 16  # tokens per block
    max_num_seqs: int = 64  # sequences running at once
    max_tokens_per_step: int = 2048  # tokens through the model in one step


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens of seq this step, starting at seq.num_computed
    samples: bool = field(init=False)  # the step reaches the last token: a new one is sampled

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed + self.num_tokens == len(self.seq.token_ids)


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.free: deque[int] = deque(range(num_blocks))

    def can_allocate(self, n: int) -> bool:
        return len(self.free) >= n

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self.free)} free")
        return [self.free.popleft() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self.free.extend(blocks)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.blocks = BlockAllocator(cfg.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._arrivals = 0

    def blocks_needed(self, seq: Sequence) -> int:
        return -(-seq.max_len // self.cfg.block_size)

    def fits_ever(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq) <= self.cfg.num_blocks

    def add(self, seq: Sequence) -> None:
        if not self.fits_ever(seq):
            raise ValueError(
                f"sequence {seq.seq_id} needs {seq.max_len} tokens of KV cache; "
                f"the cache holds {self.cfg.num_blocks * self.cfg.block_size}"
            )
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        """The work of the next step: running sequences first, then newly admitted ones."""
        budget = self.cfg.max_tokens_per_step
        plan = []
        for seq in self.running:
            n = min(seq.num_uncomputed, budget)
            if n > 0:
                plan.append(ScheduledSeq(seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            need = self.blocks_needed(seq)
            if not self.blocks.can_allocate(need):
                break  # first come, first served: later arrivals wait too
            self.waiting.popleft()
            seq.block_table = self.blocks.allocate(need)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            plan.append(ScheduledSeq(seq, n))
            budget -= n
        return plan

    def advance(self, plan: list[ScheduledSeq]) -> None:
        """Record that the plan's tokens are now in the cache."""
        for s in plan:
            s.seq.num_computed += s.num_tokens

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (done or aborted) and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq.block_table)
            seq.block_table = []
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def find(self, seq_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.seq_id == seq_id:
                return seq
        return None

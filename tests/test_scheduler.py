"""The scheduler on its own: no model, no torch."""

from __future__ import annotations

import pytest
from expertmesh.router.scheduler import Scheduler, SchedulerConfig, Sequence, Status


def sched(**kw):
    return Scheduler(SchedulerConfig(**{"num_blocks": 64, "block_size": 4, **kw}))


def run_step(s: Scheduler, new_token=7):
    """One engine step without a model: every sampling sequence gets `new_token`."""
    plan = s.schedule()
    s.advance(plan)
    for p in plan:
        if p.samples:
            p.seq.token_ids.append(new_token)
            if p.seq.num_generated >= p.seq.max_tokens:
                s.finish(p.seq)
    return plan


def test_prefill_then_decode():
    s = sched()
    s.add(Sequence("a", [1, 2, 3], max_tokens=2))
    plan = run_step(s)
    assert [(p.seq.seq_id, p.num_tokens, p.samples) for p in plan] == [("a", 3, True)]
    plan = run_step(s)
    assert [(p.num_tokens, p.samples) for p in plan] == [(1, True)]
    assert not s.has_work()


def test_new_request_joins_a_running_batch():
    s = sched()
    s.add(Sequence("a", [1, 2], max_tokens=5))
    run_step(s)
    s.add(Sequence("b", [1, 2, 3, 4], max_tokens=5))
    plan = run_step(s)
    assert [(p.seq.seq_id, p.num_tokens) for p in plan] == [("a", 1), ("b", 4)]


def test_token_budget_chunks_long_prompts():
    s = sched(max_tokens_per_step=5)
    s.add(Sequence("a", list(range(12)), max_tokens=1))
    chunks = []
    while s.has_work():
        plan = run_step(s)
        chunks.append([(p.num_tokens, p.samples) for p in plan])
    assert chunks == [[(5, False)], [(5, False)], [(2, True)]]


def test_budget_is_shared_running_first():
    s = sched(max_tokens_per_step=4)
    s.add(Sequence("a", [1], max_tokens=9))
    run_step(s)
    s.add(Sequence("b", list(range(10)), max_tokens=1))
    plan = run_step(s)
    assert [(p.seq.seq_id, p.num_tokens) for p in plan] == [("a", 1), ("b", 3)]
    assert sum(p.num_tokens for p in plan) <= 4


def test_max_num_seqs_caps_the_batch():
    s = sched(max_num_seqs=2)
    for i in range(3):
        s.add(Sequence(str(i), [1, 2], max_tokens=3))
    plan = run_step(s)
    assert [p.seq.seq_id for p in plan] == ["0", "1"]
    assert [q.seq_id for q in s.waiting] == ["2"]


def test_blocks_are_reserved_and_released():
    s = sched(num_blocks=4)  # 16 tokens
    s.add(Sequence("a", [1] * 5, max_tokens=3))  # 8 tokens: 2 blocks
    s.add(Sequence("b", [1] * 5, max_tokens=7))  # 12 tokens: 3 blocks, must wait
    run_step(s)
    assert [q.seq_id for q in s.waiting] == ["b"] and len(s.blocks.free) == 2
    while s.find("a"):
        run_step(s)
    run_step(s)
    assert s.find("b").status is Status.RUNNING and len(s.blocks.free) == 1


def test_sequence_that_can_never_fit_is_refused():
    s = sched(num_blocks=2)
    with pytest.raises(ValueError, match="KV cache"):
        s.add(Sequence("a", [1] * 6, max_tokens=3))


def test_fifo_no_overtaking():
    s = sched(num_blocks=4)
    s.add(Sequence("big", [1] * 4, max_tokens=12))  # all 4 blocks
    s.add(Sequence("big2", [1] * 4, max_tokens=12))
    s.add(Sequence("small", [1], max_tokens=1))
    run_step(s)
    assert [q.seq_id for q in s.waiting] == ["big2", "small"]


def test_abort_frees_blocks_in_any_state():
    s = sched(num_blocks=4)
    a, b = Sequence("a", [1] * 4, max_tokens=12), Sequence("b", [1], max_tokens=1)
    s.add(a)
    s.add(b)
    run_step(s)
    s.finish(b)  # waiting
    s.finish(a)  # running
    assert not s.has_work() and len(s.blocks.free) == 4
    assert a.status is Status.FINISHED and b.status is Status.FINISHED

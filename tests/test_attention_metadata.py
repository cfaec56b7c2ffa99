"""A step's attention metadata: positions, cache slots, masks, and the groups attention runs in."""

from __future__ import annotations

import random

import pytest
from expertmesh.router.attention_metadata import build_step
from expertmesh.router.scheduler import ScheduledSeq, Sequence


def plan_of(contexts: list[int], new: list[int], block_size: int, seed: int) -> list[ScheduledSeq]:
    """Sequences with `contexts[i]` tokens cached, bringing `new[i]` tokens this step."""
    rng, plan, free = random.Random(seed), [], list(range(1000))
    rng.shuffle(free)
    for i, (ctx, n) in enumerate(zip(contexts, new)):
        seq = Sequence(f"s{i}", [rng.randrange(5, 100) for _ in range(ctx + n)], max_tokens=8)
        seq.num_computed = ctx
        seq.block_table = [free.pop() for _ in range(-(-(ctx + n) // block_size))]
        plan.append(ScheduledSeq(seq, n))
    return plan


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seed", range(4))
def test_a_decode_step_is_one_group_without_padding(block_size, seed):
    rng = random.Random(seed)
    contexts = [rng.randrange(0, 70) for _ in range(rng.randrange(1, 9))]
    plan = plan_of(contexts, [1] * len(contexts), block_size, seed)
    ids, meta = build_step(plan, block_size)
    [group] = meta.groups
    assert group.decode and group.tokens is None
    assert meta.positions.tolist() == contexts
    assert ids.tolist() == [s.seq.token_ids[c] for s, c in zip(plan, contexts)]
    nblk = -(-(max(contexts) + 1) // block_size)
    assert group.kv_blocks.shape == (len(plan), nblk)
    for b, (s, c) in enumerate(zip(plan, contexts)):
        table = s.seq.block_table
        assert meta.slot_mapping[b] == table[c // block_size] * block_size + c % block_size
        assert group.mask[b, 0, 0].tolist() == [j <= c for j in range(nblk * block_size)]
        assert group.kv_blocks[b, : len(table)].tolist() == table[:nblk]


def test_a_mixed_step_splits_decodes_from_chunks():
    plan = plan_of([10, 0, 5, 3], [1, 7, 1, 4], block_size=4, seed=1)
    ids, meta = build_step(plan, 4)
    assert ids.shape == (13,) and len(meta.groups) == 2
    decode, chunks = meta.groups
    assert decode.decode and decode.tokens.tolist() == [0, 8]  # the two one-token sequences
    assert not chunks.decode and chunks.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12]
    assert meta.positions.tolist() == [10, 0, 1, 2, 3, 4, 5, 6, 5, 3, 4, 5, 6]
    assert meta.last_index.tolist() == [0, 7, 8, 12]

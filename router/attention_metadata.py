"""Attention metadata of one step: a scheduler plan as flat tokens and paged-attention indices.

Attention runs as padded SDPA calls over [B, heads, Qmax, Lmax], one per group of sequences.
A step that mixes decoding sequences (one new token each) with prompt chunks splits them into
two groups: padded together, every decoding sequence would be padded to the longest chunk's
query length (a 64-token prompt beside 31 decodes made a [32, heads, 64, Lmax] attention for 95
real queries, in half the steps of a busy server).
"""

from __future__ import annotations

import torch

from .layers import AttnGroup, AttnMeta
from .scheduler import ScheduledSeq


def build_step(
    plan: list[ScheduledSeq], block_size: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, AttnMeta]:
    """input_ids [T] and the AttnMeta of one step; T tokens ordered by sequence."""
    starts = [s.seq.num_computed for s in plan]  # first new position of each sequence
    q_lens = [s.num_tokens for s in plan]
    ids = [t for s, st, n in zip(plan, starts, q_lens) for t in s.seq.token_ids[st : st + n]]
    start = torch.tensor(starts)  # [B]
    q_len = torch.tensor(q_lens)  # [B]
    lmax = max(st + n for st, n in zip(starts, q_lens))
    nblk = -(-lmax // block_size)
    tables = torch.tensor([_padded(s.seq.block_table, nblk) for s in plan])  # [B, nblk]
    offsets = torch.cumsum(q_len, 0) - q_len  # [B] where each sequence starts in T
    rows = torch.arange(len(plan)).repeat_interleave(q_len)  # [T] sequence of each token
    positions = start[rows] + torch.arange(len(ids)) - offsets[rows]  # [T]
    slot_mapping = tables[rows, positions // block_size] * block_size + positions % block_size

    decoding = [i for i, n in enumerate(q_lens) if n == 1]
    if not decoding or len(decoding) == len(plan):
        parts = [None]  # one group: every sequence, tokens in order
    else:
        chunks = [i for i, n in enumerate(q_lens) if n > 1]
        parts = [torch.tensor(decoding), torch.tensor(chunks)]
    groups = [
        _group(p, start, q_len, offsets, tables, block_size, device, len(parts) > 1) for p in parts
    ]
    meta = AttnMeta(
        positions=positions.to(device),
        slot_mapping=slot_mapping.to(device),
        last_index=(offsets + q_len - 1).to(device),
        groups=groups,
    )
    return torch.tensor(ids, dtype=torch.long, device=device), meta


def _group(seqs, start, q_len, offsets, tables, block_size, device, split: bool) -> AttnGroup:
    """The padded attention of sequences `seqs` ([Bg] indices into the plan; None: all)."""
    if seqs is not None:
        start, q_len, offsets, tables = start[seqs], q_len[seqs], offsets[seqs], tables[seqs]
    qmax, nblk = int(q_len.max()), -(-int((start + q_len).max()) // block_size)
    j = torch.arange(nblk * block_size)  # key positions, up to whole blocks
    i = torch.arange(qmax)
    q_valid = i[None, :] < q_len[:, None]  # [Bg, Qmax]
    q_index = torch.where(q_valid, offsets[:, None] + i[None, :], offsets[:1, None])  # into T
    q_pos = start[:, None] + i[None, :]  # [Bg, Qmax]
    mask = j[None, None, :] <= q_pos[:, :, None]  # causal; also bounds keys by the context
    mask = mask | (~q_valid[:, :, None] & (j == 0)[None, None, :])  # padding rows see key 0
    return AttnGroup(
        q_index=q_index.to(device),
        q_valid=q_valid.to(device),
        kv_blocks=tables[:, :nblk].contiguous().to(device),
        block_size=block_size,
        mask=mask[:, None].to(device),
        tokens=q_index[q_valid].to(device) if split else None,
        decode=qmax == 1,
        context_lens=(start + q_len).to(device),
    )


def _padded(table: list[int], n: int) -> list[int]:
    return table[:n] + [0] * (n - len(table[:n]))

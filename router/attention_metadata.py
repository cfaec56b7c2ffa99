"""Attention metadata of one step: a scheduler plan as flat tokens and paged-attention indices."""

from __future__ import annotations

import torch

from .layers import AttnMeta
from .scheduler import ScheduledSeq


def build_step(
    plan: list[ScheduledSeq], block_size: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, AttnMeta]:
    """input_ids [T] and the AttnMeta of one step; T tokens ordered by sequence."""
    starts = [s.seq.num_computed for s in plan]  # first new position of each sequence
    q_lens = [s.num_tokens for s in plan]
    ids = [t for s, st, n in zip(plan, starts, q_lens) for t in s.seq.token_ids[st : st + n]]
    b, qmax = len(plan), max(q_lens)
    ctx = torch.tensor([st + n for st, n in zip(starts, q_lens)])  # [B] context after the step
    start = torch.tensor(starts)  # [B]
    q_len = torch.tensor(q_lens)  # [B]
    lmax = int(ctx.max())
    nblk = -(-lmax // block_size)
    tables = torch.tensor([_padded(s.seq.block_table, nblk) for s in plan])  # [B, nblk]

    j = torch.arange(lmax)  # key positions
    kv_slots = tables[:, j // block_size] * block_size + j % block_size  # [B, Lmax]
    i = torch.arange(qmax)
    q_valid = i[None, :] < q_len[:, None]  # [B, Qmax]
    offsets = torch.cumsum(q_len, 0) - q_len  # [B] where each sequence starts in T
    q_index = torch.where(q_valid, offsets[:, None] + i[None, :], 0)  # [B, Qmax]
    q_pos = start[:, None] + i[None, :]  # [B, Qmax]
    mask = j[None, None, :] <= q_pos[:, :, None]  # causal; also bounds keys by the context
    mask = mask | (~q_valid[:, :, None] & (j == 0)[None, None, :])  # padding rows see key 0
    positions = q_pos[q_valid]  # [T]
    rows = torch.arange(b).repeat_interleave(q_len)  # [T] sequence of each token
    slot_mapping = kv_slots[rows, positions]  # [T]
    meta = AttnMeta(
        positions=positions.to(device),
        slot_mapping=slot_mapping.to(device),
        q_index=q_index.to(device),
        q_valid=q_valid.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask[:, None].to(device),
        last_index=(offsets + q_len - 1).to(device),
        decode=qmax == 1,
    )
    return torch.tensor(ids, dtype=torch.long, device=device), meta


def _padded(table: list[int], n: int) -> list[int]:
    return table[:n] + [0] * (n - len(table[:n]))

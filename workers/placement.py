"""Which shard (expert worker) owns which routed expert. The same map holds in every MoE layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    num_shards: int
    owner: tuple[int, ...]  # owner[e] = shard of expert e

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError("need at least one expert shard")
        bad = [e for e, s in enumerate(self.owner) if not 0 <= s < self.num_shards]
        if bad:
            raise ValueError(f"experts {bad} are placed on no shard in 0..{self.num_shards - 1}")

    @classmethod
    def contiguous(cls, num_experts: int, num_shards: int, groups: int = 1) -> ExpertPlacement:
        """Blocks as even as possible: 8 experts over 3 shards -> 3, 3, 2.

        `groups`: the id space is that many equal ranges (VL: text experts, then vision
        experts), each split in blocks over all shards, so every shard serves every modality:
        8 experts in 2 groups over 2 shards -> 0, 0, 1, 1, 0, 0, 1, 1."""
        if num_experts % groups:
            raise ValueError(f"{num_experts} experts do not split into {groups} equal groups")
        per_group = num_experts // groups
        if num_shards > per_group:
            raise ValueError(f"{num_shards} shards for {per_group} experts: some would be empty")
        base, extra = divmod(per_group, num_shards)
        owner: list[int] = []
        for s in range(num_shards):
            owner += [s] * (base + (s < extra))
        return cls(num_shards, tuple(owner) * groups)

    @classmethod
    def from_map(cls, owner: Sequence[int], num_experts: int) -> ExpertPlacement:
        if len(owner) != num_experts:
            raise ValueError(f"expert map has {len(owner)} entries for {num_experts} experts")
        return cls(max(owner) + 1, tuple(int(s) for s in owner))

    @property
    def num_experts(self) -> int:
        return len(self.owner)

    def experts_of(self, shard: int) -> list[int]:
        return [e for e, s in enumerate(self.owner) if s == shard]

    def owner_tensor(self) -> torch.Tensor:
        return torch.tensor(self.owner, dtype=torch.long)  # [E]

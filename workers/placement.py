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
    def contiguous(cls, num_experts: int, num_shards: int) -> ExpertPlacement:
        """Blocks as even as possible: 8 experts over 3 shards -> 3, 3, 2."""
        if num_shards > num_experts:
            raise ValueError(f"{num_shards} shards for {num_experts} experts: some would be empty")
        base, extra = divmod(num_experts, num_shards)
        owner: list[int] = []
        for s in range(num_shards):
            owner += [s] * (base + (s < extra))
        return cls(num_shards, tuple(owner))

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

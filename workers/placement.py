"""Which shards (expert workers) hold which routed experts. The same map holds in every MoE layer.

Each expert has one copy or, for load balancing (as DeepSeek's EPLB), several on distinct
shards: a hot expert's tokens are then split between its copies. `balanced` computes such a
placement from the tokens each expert received; its copies go to the hottest experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    num_shards: int
    owner: tuple[int, ...]  # owner[e] = shard of expert e (its first copy)
    # copies[e] = the shards holding expert e, owner first, all distinct; () = owner only
    copies: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError("need at least one expert shard")
        if not self.copies:
            object.__setattr__(self, "copies", tuple((s,) for s in self.owner))
        if len(self.copies) != len(self.owner):
            raise ValueError(f"{len(self.copies)} copy lists for {len(self.owner)} experts")
        bad = [
            e
            for e, c in enumerate(self.copies)
            if not c or not all(0 <= s < self.num_shards for s in c) or c[0] != self.owner[e]
        ]
        if bad:
            raise ValueError(f"experts {bad} are placed on no shard in 0..{self.num_shards - 1}")
        doubled = [e for e, c in enumerate(self.copies) if len(set(c)) != len(c)]
        if doubled:
            raise ValueError(f"experts {doubled} have two copies on one shard")

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

    @classmethod
    def from_copies(cls, copies: Sequence[Sequence[int]], num_shards: int) -> ExpertPlacement:
        copies = tuple(tuple(int(s) for s in c) for c in copies)
        return cls(num_shards, tuple(c[0] if c else -1 for c in copies), copies)

    @property
    def num_experts(self) -> int:
        return len(self.owner)

    @property
    def num_copies(self) -> int:
        """Expert copies over all shards: num_experts plus the redundant ones."""
        return sum(len(c) for c in self.copies)

    def experts_of(self, shard: int) -> list[int]:
        """The experts shard `shard` holds (a copy or the only one), in id order."""
        return [e for e, c in enumerate(self.copies) if shard in c]

    def owner_tensor(self) -> torch.Tensor:
        return torch.tensor(self.owner, dtype=torch.long)  # [E]

    def copy_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """table [E, C] (C: the most copies of any expert; row e = its shards, repeated past
        its own count) and count [E] of copies per expert, for `shards_of_slots`."""
        width = max(len(c) for c in self.copies)
        table = [[c[j % len(c)] for j in range(width)] for c in self.copies]
        count = [len(c) for c in self.copies]
        return torch.tensor(table, dtype=torch.long), torch.tensor(count, dtype=torch.long)

    def shard_loads(self, load: Sequence[float]) -> list[float]:
        """Each shard's share of `load` (per expert), an expert's load split evenly over its
        copies (as `shards_of_slots` splits its tokens)."""
        out = [0.0] * self.num_shards
        for e, c in enumerate(self.copies):
            for s in c:
                out[s] += load[e] / len(c)
        return out

    def imbalance(self, load: Sequence[float]) -> float:
        """Busiest shard's load over the mean shard's: 1.0 is perfect balance."""
        loads = self.shard_loads(load)
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0


def shards_of_slots(expert_ids: torch.Tensor, table: torch.Tensor, count: torch.Tensor):
    """The shard each (token, slot) goes to: an expert with c copies sends token t to copy
    t % c. Deterministic and balanced, with nothing to agree on between shards.

    expert_ids: [T, k]; table [E, C], count [E]: `ExpertPlacement.copy_table`. Returns [T, k].
    """
    t = torch.arange(expert_ids.shape[0], device=expert_ids.device)[:, None]  # [T, 1]
    return table[expert_ids, t % count[expert_ids]]  # [T, k]


def balanced(load: Sequence[float], num_shards: int, redundant: int = 0) -> ExpertPlacement:
    """A placement for per-expert `load` (tokens routed to each expert) with up to `redundant`
    extra copies, every shard the same number of slots (rounded up): of the placements that
    `_greedy` makes with 0..redundant extra copies, the best balanced (then the fewest copies).

    More copies do not always balance better: the copies of an expert split its load evenly
    over distinct shards, and the slots they take are then missing for the light experts
    that fill the gaps; so each count is tried (cheap: E x shards steps each).
    """
    num_experts = len(load)
    if num_shards < 1 or num_experts < num_shards:
        raise ValueError(f"{num_experts} experts cannot fill {num_shards} shards")
    if not 0 <= redundant <= num_experts * (num_shards - 1):
        raise ValueError(
            f"redundant_experts={redundant}: each of {num_experts} experts has at most one "
            f"copy on each of {num_shards} shards, so at most {num_experts * (num_shards - 1)}"
        )
    load = [float(x) for x in load]
    made = [_greedy(load, num_shards, r) for r in range(redundant + 1)]
    return min(made, key=lambda p: (round(p.imbalance(load), 9), p.num_copies))


def _greedy(load: list[float], num_shards: int, redundant: int) -> ExpertPlacement:
    """Each extra copy goes, one at a time, to the expert with the most load per copy; then
    the copies, heaviest first, each go to the least loaded shard with room that has no copy
    of that expert yet (longest processing time first). Ties go to the lower id."""
    num_experts = len(load)
    n = [1] * num_experts  # copies per expert
    for _ in range(redundant):
        e = max((e for e in range(num_experts) if n[e] < num_shards), key=lambda e: load[e] / n[e])
        n[e] += 1
    room = -(-(num_experts + redundant) // num_shards)  # slots per shard
    held: list[list[int]] = [[] for _ in range(num_shards)]
    weight = [0.0] * num_shards
    order = sorted(
        ((load[e] / n[e], e) for e in range(num_experts) for _ in range(n[e])),
        key=lambda item: (-item[0], item[1]),
    )
    for w, e in order:
        open_ = [s for s in range(num_shards) if len(held[s]) < room and e not in held[s]]
        if not open_:
            open_ = [_make_room(held, room, e, load, n, weight)]
        s = min(open_, key=lambda s: (weight[s], len(held[s]), s))
        held[s].append(e)
        weight[s] += w
    copies = [[s for s in range(num_shards) if e in held[s]] for e in range(num_experts)]
    return ExpertPlacement.from_copies(copies, num_shards)


def _make_room(held: list[list[int]], room: int, e: int, load, n, weight) -> int:
    """Every shard with room already holds expert e: move another expert f from a full
    shard t without e to a shard s with room (s lacks f: t holds more experts than s besides
    e), so that t can take e. Returns t."""
    s = next(s for s in range(len(held)) if len(held[s]) < room)
    t = next(t for t in range(len(held)) if e not in held[t])
    f = next(f for f in held[t] if f not in held[s])
    held[t].remove(f)
    held[s].append(f)
    weight[t] -= load[f] / n[f]
    weight[s] += load[f] / n[f]
    return t

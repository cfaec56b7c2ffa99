"""An expert shard: the routed experts one worker owns, in every MoE layer.

No communication here: a transport hands it token rows and gets pre-summed rows back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from expertmesh.ernie.checkpoint import CheckpointReader, expert_keys
from expertmesh.ernie.config import ModelConfig
from tqdm import tqdm

log = logging.getLogger(__name__)


def grouped_swiglu(
    x: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum over each row's experts of SwiGLU(x_row); one matmul pair per expert present.

    x: [N, H]; local_ids: [N, k] index into w13/w2, -1 where the slot is not ours;
    weights: [N, k]; w13: [E_local, 2I, H] (gate rows, then up rows); w2: [E_local, H, I].
    Returns [N, H].
    """
    n, k = local_ids.shape
    flat = local_ids.reshape(-1)  # [N*k]
    keep = (flat >= 0).nonzero().squeeze(-1)  # pairs that are ours
    ids = flat[keep]
    order = torch.argsort(ids, stable=True)
    pair = keep[order]  # (row, slot) pairs grouped by expert
    rows = torch.div(pair, k, rounding_mode="floor")  # [P]
    counts = torch.bincount(ids, minlength=w13.shape[0]).tolist()

    xs = x[rows]  # [P, H]
    outs = []
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        seg = xs[start : start + c]  # [c, H]
        gate, up = F.linear(seg, w13[e]).chunk(2, dim=-1)  # [c, I] each
        outs.append(F.linear(F.silu(gate) * up, w2[e]))  # [c, H]
        start += c
    out = torch.zeros_like(x)
    if outs:
        y = torch.cat(outs) * weights.reshape(-1)[pair, None].to(x.dtype)  # [P, H]
        out.index_add_(0, rows, y)
    return out


class ExpertShard:
    """Weights of the experts in `experts` for every MoE layer of the model."""

    def __init__(self, cfg: ModelConfig, experts: Sequence[int], weights: dict[int, tuple]):
        self.cfg = cfg
        self.experts = list(experts)
        # global expert id -> local index, -1 for experts owned elsewhere
        g2l = torch.full((cfg.num_experts + 1,), -1, dtype=torch.long)
        g2l[torch.tensor(self.experts, dtype=torch.long)] = torch.arange(len(self.experts))
        self._g2l = g2l  # the extra last entry maps the -1 padding id to -1
        self.weights = weights  # layer -> (w13 [E_local, 2I, H], w2 [E_local, H, I])

    @classmethod
    def load(
        cls,
        reader: CheckpointReader,
        cfg: ModelConfig,
        experts: Sequence[int],
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        progress: str | None = None,
    ) -> ExpertShard:
        """Read only the tensors of `experts`, in every MoE layer; `progress` names a tqdm bar."""
        weights = {}
        layers = tqdm(
            cfg.moe_layers, desc=progress, unit="layer", disable=progress is None, mininterval=1.0
        )
        n, h, inter = len(experts), cfg.hidden_size, cfg.moe_intermediate_size
        for layer in layers:
            w13 = torch.empty(n, 2 * inter, h, dtype=dtype, device=device)  # [E_local, 2I, H]
            w2 = torch.empty(n, h, inter, dtype=dtype, device=device)  # [E_local, H, I]
            for j, e in enumerate(experts):
                gate, up, down = (
                    reader.read(key, shape, dtype)
                    for key, shape in expert_keys(cfg, layer, e).items()
                )
                w13[j, :inter], w13[j, inter:], w2[j] = gate, up, down
            weights[layer] = (w13, w2)
        log.info("expert shard loaded %d experts x %d layers", len(experts), len(cfg.moe_layers))
        return cls(cfg, experts, weights)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.weights.values() for t in pair)

    def forward(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x: [N, H]; expert_ids: [N, k] global ids (-1 = not routed here); weights: [N, k]."""
        w13, w2 = self.weights[layer]
        g2l = self._g2l.to(expert_ids.device)
        local = g2l[expert_ids]  # -1 indexes the last entry, which is -1
        return grouped_swiglu(x, local, weights, w13, w2)

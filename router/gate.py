"""ERNIE 4.5's router: which experts each token goes to, and with what weight.

ERNIE-4.5-VL routes by modality: text tokens by the text gate among the text experts
(0..E-1), vision tokens (image placeholders, image start and end) by the vision gate among the
vision experts, whose ids are E..2E-1 as the checkpoint numbers them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Statics(nn.Module):
    """Holds the gate's correction bias (Hub key `mlp.moe_statics.e_score_correction_bias`);
    VL: one row per modality (text, vision)."""

    def __init__(self, num_experts: int, groups: int = 1):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(groups, num_experts))  # [G, E]


class ModalGate(nn.Module):
    """The VL router: text gate `weight` and vision gate `weight_1`, both [H, E] as the Hub
    stores them (`mlp.gate.weight`, `mlp.gate.weight_1`), in fp32."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden, num_experts))  # [H, E] text
        self.weight_1 = nn.Parameter(torch.zeros(hidden, num_experts))  # [H, E] vision

    def route(
        self,
        x: torch.Tensor,
        correction_bias: torch.Tensor,
        vision: torch.Tensor | None,
        top_k: int,
        norm_min: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H]; correction_bias: [2, E]; vision: [T] bool (None: all text).

        Returns weights [T, k] and global expert ids [T, k]: vision tokens get E + their pick."""
        if vision is None:
            return route(x, self.weight.t(), correction_bias[0], top_k, norm_min)
        t, e = x.shape[0], self.weight.shape[1]
        weights = torch.empty(t, top_k, dtype=x.dtype, device=x.device)  # [T, k]
        ids = torch.empty(t, top_k, dtype=torch.long, device=x.device)  # [T, k]
        text = ~vision
        weights[text], ids[text] = route(
            x[text], self.weight.t(), correction_bias[0], top_k, norm_min
        )
        vw, vi = route(x[vision], self.weight_1.t(), correction_bias[1], top_k, norm_min)
        weights[vision], ids[vision] = vw, vi + e
        return weights, ids


def route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    norm_min: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token.

    x: [T, H]; gate_weight: [E, H] (fp32); correction_bias: [1, E].
    Returns weights [T, k] (in x's dtype) and expert ids [T, k] (int64).
    The choice uses probabilities plus the correction bias; the weights are the chosen
    probabilities without the bias, renormalised with a floor of `norm_min`.
    """
    logits = F.linear(x.float(), gate_weight.float())  # [T, E] fp32
    probs = F.softmax(logits, dim=-1)
    _, ids = torch.topk(probs + correction_bias.float().reshape(1, -1), top_k, dim=-1)
    weights = probs.gather(-1, ids)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=norm_min)
    return weights.to(x.dtype), ids

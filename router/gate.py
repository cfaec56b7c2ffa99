"""ERNIE 4.5's router: which experts each token goes to, and with what weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Statics(nn.Module):
    """Holds the gate's correction bias (Hub key `mlp.moe_statics.e_score_correction_bias`)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts))  # [1, E] fp32


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

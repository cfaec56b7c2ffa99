"""The gateway's part of ERNIE 4.5 MoE: everything except the routed experts.

Module names mirror the Hub checkpoint keys (`model.layers.N.self_attn.q_proj.weight`, ...),
so loading reads each parameter by its own name. The routed experts are reached through a
dispatcher handed to `forward`. An ERNIE-4.5-VL checkpoint adds the image encoder
(`model.vision_model`, `model.resampler_model`), modality-isolated routing and 3D rotary
positions, which a step's `MultimodalStep` carries; without one the VL model is the text model.
"""

from __future__ import annotations

import torch
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from torch import nn

from . import decode_attention
from .dispatch import Dispatcher
from .gate import ModalGate, Statics, route
from .layers import MLP, Attention, AttnMeta, ProjectedLinear, RMSNorm, Rotary, rotation
from .mrope import MRotary
from .multimodal import MultimodalStep
from .vision import Resampler, VisionTower, axial_inv_freq


class MoEBlock(nn.Module):
    """Gate and shared experts; the routed experts are behind the dispatcher."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.top_k, self.norm_min = layer, cfg.top_k, cfg.moe_norm_min
        e = cfg.num_text_experts
        if cfg.is_vl:  # a text and a vision gate, a bias row each; experts 0..E-1 and E..2E-1
            self.gate = ModalGate(cfg.hidden_size, e)
            self.moe_statics = Statics(e, groups=2)
        else:
            self.gate = nn.Linear(cfg.hidden_size, e, bias=False)  # fp32
            self.moe_statics = Statics(e)
        inter = cfg.moe_intermediate_size * cfg.num_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, inter, cfg.use_bias) if inter else None
        self.last_routing: torch.Tensor | None = None  # [T, k] expert ids of the last step

    def forward(
        self, x: torch.Tensor, dispatcher: Dispatcher, vision: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: [T, H]; vision: [T] bool, tokens for the vision experts (VL; None: all text)
        bias = self.moe_statics.e_score_correction_bias
        if isinstance(self.gate, ModalGate):
            weights, ids = self.gate.route(x, bias, vision, self.top_k, self.norm_min)
        else:
            weights, ids = route(x, self.gate.weight, bias, self.top_k, self.norm_min)
        self.last_routing = ids
        pending = dispatcher.dispatch(self.layer, x, ids, weights)
        # the shared experts compute while the routed rows are away
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        out = dispatcher.combine(pending, x)
        return out if shared is None else out + shared


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        if cfg.is_moe_layer(layer):
            self.mlp = MoEBlock(cfg, layer)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.use_bias)

    def forward(self, x, rope, k_cache, v_cache, meta: AttnMeta, dispatcher: Dispatcher, vision):
        x = x + self.self_attn(self.input_layernorm(x), rope, k_cache, v_cache, meta)
        h = self.post_attention_layernorm(x)
        h = self.mlp(h, dispatcher, vision) if isinstance(self.mlp, MoEBlock) else self.mlp(h)
        return x + h


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        if cfg.vision is not None:
            self.vision_model = VisionTower(cfg.vision)
            self.resampler_model = Resampler(cfg.vision, cfg.hidden_size, cfg.rms_eps)


def _rotary(cfg: ModelConfig) -> nn.Module:
    if cfg.is_vl:
        return MRotary(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    return Rotary(cfg.head_dim, cfg.rope_theta)


class GatewayModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        bias = cfg.use_bias and not cfg.is_vl  # the VL model's lm_head never has one
        # packed on CPU: a copy, the (tied) embedding stays dense
        self.lm_head = ProjectedLinear(cfg.hidden_size, cfg.vocab_size, bias=bias)
        self.rotary = _rotary(cfg)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttnMeta,
        kv: tuple[torch.Tensor, torch.Tensor],
        dispatcher: Dispatcher,
        mm: MultimodalStep | None = None,
    ) -> torch.Tensor:
        """input_ids: [T]; kv: k and v caches [layers, slots, kv_heads, D]; mm: the step's
        image embeddings, 3D positions and vision tokens (VL; None for a text-only step).

        Returns the logits of each sequence's last token this step: [B, V] in fp32 (of the
        rows of `meta.logit_index` instead, where it is set: [R, V]).
        """
        x = self.model.embed_tokens(input_ids)  # [T, H]
        positions, vision = meta.positions, None
        if mm is not None:
            if mm.image_rows is not None:
                x = x.index_copy(0, mm.image_rows, mm.image_embeds.to(x.dtype))
            positions, vision = mm.rope_positions, mm.vision  # [3, T], [T] or None
        rope = self.rope(positions)
        k_cache, v_cache = kv
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, k_cache[i], v_cache[i], meta, dispatcher, vision)
        rows = meta.last_index if meta.logit_index is None else meta.logit_index
        x = self.model.norm(x[rows])  # [B, H] (or [R, H])
        return self.lm_head(x).float()  # [B, V] (or [R, V])

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: [T] or [3, T] (VL) -> each token's rotations [T, 1, D/2] (complex64)."""
        return rotation(*self.rotary(positions))

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixels: [N, C*p*p]; grid_thw: [images, 3] -> image tokens [N / merge^2, H]."""
        dtype = self.model.embed_tokens.weight.dtype
        patches = self.model.vision_model(pixels.to(self.lm_head.weight.device, dtype), grid_thw)
        return self.model.resampler_model(patches, grid_thw)

    def routing(self) -> list[torch.Tensor]:
        """Expert ids [T, k] chosen in each MoE layer during the last forward."""
        return [
            layer.mlp.last_routing for layer in self.model.layers if isinstance(layer.mlp, MoEBlock)
        ]

    @classmethod
    def load(
        cls,
        reader: CheckpointReader,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> GatewayModel:
        """Read every non-expert tensor; the router gate and its bias stay in fp32."""
        with torch.device("meta"):
            model = cls(cfg)
        state = {}
        for name, p in model.named_parameters():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                state[name] = state["model.embed_tokens.weight"]
                continue
            fp32 = name.endswith(FP32_SUFFIXES) or "moe_statics" in name
            state[name] = reader.read(name, tuple(p.shape), torch.float32 if fp32 else dtype)
        model.load_state_dict(state, assign=True)
        model.rotary = _rotary(cfg)
        if cfg.is_vl:
            tower = model.model.vision_model
            tower.register_buffer("inv_freq", axial_inv_freq(cfg.vision), persistent=False)
        decode_attention.usable(dtype, device)  # its kernel built now, not in the first step
        return model.to(device).eval()


FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.weight_1")  # the routers

"""The model config of an ERNIE 4.5 MoE checkpoint, read from its `config.json`.

Both the Hub's original layout (top-level `rope_theta`) and what transformers writes
(`rope_parameters`) are accepted. ERNIE-4.5-VL configs (`ernie4_5_vl_moe`, as transformers'
`Ernie4_5_VLMoeConfig` writes them: `text_config` and `vision_config`) give the same
`ModelConfig` plus a `VisionConfig`: the routed experts are then one id space of text experts
0..E-1 and vision experts E..2E-1, numbered as the checkpoint numbers its expert list. The
Hub's own flat VL config (`ernie4_5_moe_vl`) is read as transformers' converter maps it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("ernie4_5_moe", "ernie4_5_vl_moe", "ernie4_5_moe_vl")


class ConfigError(ValueError):
    """A checkpoint's config.json is missing, unsupported or lacks a field."""


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower, the resampler and the image token ids of an ERNIE-4.5-VL model."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_merge_size: int = 2
    rope_theta: float = 10000.0
    eps: float = 1e-6  # the tower's and the resampler's LayerNorms
    image_token_id: int = 100295
    image_start_token_id: int = 101304
    image_end_token_id: int = 101305
    video_token_id: int = 103367
    video_start_token_id: int = 101306
    video_end_token_id: int = 101307

    @property
    def vision_token_ids(self) -> tuple[int, ...]:
        """Ids that the MoE layers route to the vision experts (placeholders, start and end)."""
        return (
            self.image_token_id,
            self.image_start_token_id,
            self.image_end_token_id,
            self.video_token_id,
            self.video_start_token_id,
            self.video_end_token_id,
        )


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int  # one routed text expert or shared expert
    num_experts: int  # routed experts in the id space: VL: E text + E vision
    top_k: int  # per token, within its modality's experts
    num_shared_experts: int
    moe_layer_start: int
    moe_layer_end: int  # inclusive
    moe_layer_interval: int
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5
    moe_norm_min: float = 1e-12
    tie_word_embeddings: bool = True
    use_bias: bool = False
    max_position_embeddings: int = 131072
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 0
    dtype: str = "float32"  # the checkpoint's own dtype
    model_type: str = "ernie4_5_moe"
    # VL: the vision experts are ids num_text_experts..num_experts-1, each this wide
    num_vision_experts: int = 0
    vision_moe_intermediate_size: int = 0
    mrope_section: tuple[int, ...] = ()  # VL: rotary pairs given to (h, w, t) positions
    sparse_layers: tuple[int, ...] | None = None  # VL: the MoE layers (mlp_layer_types)
    vision: VisionConfig | None = None
    moe_layers: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        moe = tuple(i for i in range(self.num_layers) if self._is_moe(i))
        object.__setattr__(self, "moe_layers", moe)
        if self.top_k > self.num_text_experts:
            raise ConfigError(f"moe_k={self.top_k} exceeds moe_num_experts={self.num_text_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.vision is not None:
            sec = self.mrope_section
            if len(sec) != 3 or sec[0] != sec[1] or sum(sec) != self.head_dim // 2:
                raise ConfigError(
                    f"rope_parameters.mrope_section {list(sec)} must be [n, n, m] summing to "
                    f"head_dim/2 = {self.head_dim // 2}"
                )

    def _is_moe(self, i: int) -> bool:
        if self.sparse_layers is not None:
            return i in self.sparse_layers
        # the rule of transformers' Ernie4_5_MoeDecoderLayer
        return (
            i + 1
        ) % self.moe_layer_interval == 0 and self.moe_layer_start <= i <= self.moe_layer_end

    @property
    def is_vl(self) -> bool:
        return self.vision is not None

    @property
    def num_text_experts(self) -> int:
        return self.num_experts - self.num_vision_experts

    def expert_width(self, expert: int) -> int:
        """Intermediate size of routed expert `expert` (a global id)."""
        if expert >= self.num_text_experts:
            return self.vision_moe_intermediate_size
        return self.moe_intermediate_size

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not path.exists():
            raise ConfigError(f"model directory {str(path)!r} does not exist")
        if not path.is_dir():
            raise ConfigError(f"model path {str(path)!r} is not a directory")
        if not cfg_file.is_file():
            raise ConfigError(f"no config.json in {str(path)!r}")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from e
        eos = _generation_eos(path)
        return cls.from_dict(raw, eos_override=eos)

    @classmethod
    def from_dict(cls, raw: dict, eos_override: tuple[int, ...] | None = None) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; expertmesh serves {SUPPORTED_MODEL_TYPES}"
            )
        if model_type == "ernie4_5_moe_vl":
            raw = _vl_from_original(raw)
        if raw["model_type"] == "ernie4_5_vl_moe":
            return _vl_from_dict(raw, eos_override)
        return cls._text_from_dict(raw, eos_override)

    @classmethod
    def _text_from_dict(cls, raw: dict, eos_override: tuple[int, ...] | None) -> ModelConfig:
        need = _needer(raw)

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        layers = int(need("num_hidden_layers"))
        head_dim = int(raw.get("head_dim") or hidden // heads)
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", raw.get("rope_theta", 500000.0))
        end = raw.get("moe_layer_end_index", -1)
        end = layers - 1 if end is None or end == -1 else int(end)
        eos = eos_override if eos_override is not None else _as_ids(raw.get("eos_token_id", 2))
        return cls(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            vocab_size=int(need("vocab_size")),
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(_first(need("moe_intermediate_size"))),
            num_experts=int(_first(need("moe_num_experts", "num_experts"))),
            top_k=int(need("moe_k", "num_experts_per_tok")),
            num_shared_experts=int(raw.get("moe_num_shared_experts") or 0),
            moe_layer_start=int(raw.get("moe_layer_start_index", 1)),
            moe_layer_end=end,
            moe_layer_interval=int(raw.get("moe_layer_interval", 1)),
            rope_theta=float(theta),
            rms_eps=float(raw.get("rms_norm_eps", 1e-5)),
            moe_norm_min=float(raw.get("moe_norm_min", 1e-12)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            use_bias=bool(raw.get("use_bias", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
            eos_token_ids=eos,
            pad_token_id=int(raw.get("pad_token_id") or 0),
            dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            model_type=raw["model_type"],
        )


def _needer(raw: dict):
    def need(key: str, *aliases: str):
        for k in (key, *aliases):
            if raw.get(k) is not None:
                return raw[k]
        raise ConfigError(f"config.json lacks the required field {key!r}")

    return need


def _vl_from_dict(raw: dict, eos_override: tuple[int, ...] | None) -> ModelConfig:
    """transformers' `Ernie4_5_VLMoeConfig`: `text_config`, `vision_config`, token ids on top."""
    text, vis = raw.get("text_config"), raw.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vis, dict):
        raise ConfigError("config.json lacks the required field 'text_config' or 'vision_config'")
    text = {**text, "model_type": raw["model_type"]}
    # the top-level flag is what ties lm_head to the embedding in the VL model
    text["tie_word_embeddings"] = raw.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    text.setdefault("dtype", raw.get("dtype") or raw.get("torch_dtype"))
    if text.get("eos_token_id") is None:
        text["eos_token_id"] = raw.get("eos_token_id", 2)
    base = ModelConfig._text_from_dict(
        {**text, "moe_layer_start_index": 0, "moe_layer_end_index": -1, "moe_layer_interval": 1},
        eos_override,
    )
    widths = _needer(text)("moe_intermediate_size")
    if not isinstance(widths, list) or len(widths) != 2:
        raise ConfigError("a VL config's moe_intermediate_size must be [text, vision]")
    types = text.get("mlp_layer_types") or ["dense"] + ["sparse"] * (base.num_layers - 1)
    rope = text.get("rope_parameters") or {}
    return dataclasses.replace(
        base,
        num_experts=2 * base.num_experts,
        num_vision_experts=base.num_experts,
        vision_moe_intermediate_size=int(widths[1]),
        mrope_section=tuple(int(x) for x in rope.get("mrope_section", (22, 22, 20))),
        sparse_layers=tuple(i for i, t in enumerate(types) if t == "sparse"),
        vision=_vision_from_dict(vis, raw),
    )


def _vl_from_original(raw: dict) -> dict:
    """The Hub's original flat VL config (`ernie4_5_moe_vl`) in transformers' nested form, as
    transformers' conversion script maps it."""
    text = {k: v for k, v in raw.items() if k not in ("vision_config", "model_type")}
    need = _needer(raw)
    layers = int(need("num_hidden_layers"))
    start, end = raw.get("moe_layer_start_index", 1), raw.get("moe_layer_end_index", -1)
    start = min(start) if isinstance(start, list) else start
    end = max(end) if isinstance(end, list) else end
    end = layers - 1 if end is None or end == -1 else end
    every = int(raw.get("moe_layer_interval", 1))
    text["mlp_layer_types"] = [
        "sparse" if (i + 1) % every == 0 and start <= i <= end else "dense" for i in range(layers)
    ]
    text["moe_num_experts"] = _first(need("moe_num_experts"))
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": raw.get("rope_theta", 500000.0),
        "mrope_section": raw.get("mrope_section", [22, 22, 20]),
    }
    vis = dict(need("vision_config"))
    vis.setdefault("hidden_size", vis.get("embed_dim"))
    if vis.get("mlp_ratio") and vis.get("hidden_size"):
        vis.setdefault("intermediate_size", int(vis["hidden_size"] * vis["mlp_ratio"]))
    vis["spatial_merge_size"] = raw.get("spatial_conv_size", vis.get("spatial_merge_size", 2))
    vis["temporal_merge_size"] = raw.get("temporal_conv_size", 2)
    top = {"model_type": "ernie4_5_vl_moe", "text_config": text, "vision_config": vis}
    if raw.get("im_patch_id") is not None:
        top["image_token_id"] = raw["im_patch_id"]
    for k in ("tie_word_embeddings", "dtype", "torch_dtype", "eos_token_id"):
        if k in raw:
            top[k] = raw[k]
    return top


def _vision_from_dict(vis: dict, raw: dict) -> VisionConfig:
    need = _needer(vis)
    rope = vis.get("rope_parameters") or {}
    ids = {
        k: int(raw[k])
        for k in (f"{m}_{p}token_id" for m in ("image", "video") for p in ("", "start_", "end_"))
        if raw.get(k) is not None
    }
    hidden = int(need("hidden_size"))
    return VisionConfig(
        depth=int(need("depth", "num_hidden_layers")),
        hidden_size=hidden,
        num_heads=int(need("num_heads", "num_attention_heads")),
        intermediate_size=int(vis.get("intermediate_size") or 4 * hidden),
        hidden_act=str(vis.get("hidden_act", "quick_gelu")),
        in_channels=int(vis.get("in_channels", 3)),
        patch_size=int(vis.get("patch_size", 14)),
        spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
        temporal_merge_size=int(vis.get("temporal_merge_size", 2)),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        eps=float(vis.get("rms_norm_eps", 1e-6)),
        **ids,
    )


def _first(v):
    # VL configs give [text, vision] lists; the text model uses the first.
    return v[0] if isinstance(v, list) else v


def _as_ids(v) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in (v if isinstance(v, list) else [v]))


def _generation_eos(path: Path) -> tuple[int, ...] | None:
    """EOS ids from generation_config.json, which transformers' generate prefers too."""
    f = path / "generation_config.json"
    if not f.is_file():
        return None
    try:
        eos = json.loads(f.read_text()).get("eos_token_id")
    except json.JSONDecodeError:
        return None
    return _as_ids(eos) if eos is not None else None

"""The model config of an ERNIE 4.5 MoE checkpoint, read from its `config.json`.

Both the Hub's original layout (top-level `rope_theta`) and what transformers writes
(`rope_parameters`) are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("ernie4_5_moe",)


class ConfigError(ValueError):
    """A checkpoint's config.json is missing, unsupported or lacks a field."""


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int  # one routed or shared expert
    num_experts: int
    top_k: int
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
    moe_layers: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        moe = tuple(i for i in range(self.num_layers) if self._is_moe(i))
        object.__setattr__(self, "moe_layers", moe)
        if self.top_k > self.num_experts:
            raise ConfigError(f"moe_k={self.top_k} exceeds moe_num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")

    def _is_moe(self, i: int) -> bool:
        # the rule of transformers' Ernie4_5_MoeDecoderLayer
        return (
            i + 1
        ) % self.moe_layer_interval == 0 and self.moe_layer_start <= i <= self.moe_layer_end

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

        def need(key: str, *aliases: str):
            for k in (key, *aliases):
                if raw.get(k) is not None:
                    return raw[k]
            raise ConfigError(f"config.json lacks the required field {key!r}")

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
            model_type=model_type,
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

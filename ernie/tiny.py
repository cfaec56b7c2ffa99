"""A tiny random ERNIE 4.5 MoE checkpoint in the Hub layout of `baidu/ERNIE-4.5-21B-A3B-PT`.

Written directly with safetensors (not `save_pretrained`), so the file layout is explicit and
independent of the installed transformers: per-expert tensors, a float32 router gate, the
`moe_statics.e_score_correction_bias` key, the Hub's multi-token-prediction tensors
(`model.mtp_block.0.*`, `model.mtp_emb_norm.0.weight`, `model.mtp_hidden_norm.0.weight`,
`model.mtp_linear_proj.0.weight`; random, for loaders to skip), Hub shard names, plus a
byte-level BPE tokenizer with ERNIE's chat template. Same seed => byte-identical tensors.

Readable output (`readable_only`, on by default): a byte-level BPE needs its 256 byte symbols
to encode any text, but a lone byte >= 0x80 (or a merge that cuts a character) is a partial
UTF-8 sequence and decodes to U+FFFD, and bytes < 0x20 are control characters. A random model
would emit them about as often as words. So the checkpoint gets an `lm_head.bias` (config
`use_bias: true`; every other bias is zero, so the weights are those of the bias-free model)
that is -S on the tokens that are not readable text on their own (and on the vocab padding and
the specials a model never emits), with S chosen from the weights so that each of those logits
is below every other token's by more than SUPPRESS_MARGIN, whatever the input: see
`suppression_bias`. Softmax then gives them exactly zero probability in fp32/bf16 (for any
temperature up to 2), so neither greedy nor sampled decoding can pick them, in transformers
or in the engine (same logits).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DEFAULT_TINY = dict(
    seed=0, experts=8, top_k=2, shared=1, layers=4, hidden=64, heads=4, kv_heads=2,
    head_dim=None, intermediate=None, moe_intermediate=None, moe_start=1, moe_end=-1,
    moe_interval=1, vocab=None, dtype="float32", tie_word_embeddings=True, use_bias=False,
    shards=2, readable_only=True, hot_experts=0, hot_bias=1.0,
)  # fmt: skip

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"]
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
CLS, SEP = "<|begin_of_sentence|>", "<|end_of_sentence|>"
MAX_POSITIONS = 4096
BPE_VOCAB = 512  # the BPE trainer's target; the corpus caps the real size below it

# Init scales (std of normal draws); linear weights use SCALE / sqrt(fan_in).
EMBED_STD = 0.5  # token embeddings (tied lm_head: logits std ~ EMBED_STD * sqrt(hidden))
LINEAR_GAIN = 2.0  # attention / MLP / expert projections (lower gains make greedy decoding loop)
GATE_GAIN = 2.0  # router gate, std GATE_GAIN / sqrt(hidden): logits std ~2, clearly non-uniform
CORRECTION_STD = 0.05  # e_score_correction_bias vs. probabilities ~1/E: flips ~20% of picks
NORM_NOISE = 0.1  # RMSNorm weights = 1 + NORM_NOISE * N(0, 1)
BIAS_STD = 0.02  # linear biases when use_bias
PAD_ROW_SCALE = 0.1  # embedding / lm_head rows of the vocab padding past the tokenizer
# readable_only: the suppressed tokens' logits sit more than this below every other logit.
# exp(-104) underflows to 0 in fp32 and bf16 softmax, so up to temperature 256/104 ~ 2.4 their
# probability is exactly 0. Kept modest: logits stay small enough for 1e-4 parity in fp32.
SUPPRESS_MARGIN = 256.0
NEVER_EMITTED = (UNK, BOS, CLS)  # specials a model does not generate (EOS and SEP it does)

# ERNIE 4.5's template; content may also be a list of {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{%- if add_generation_prompt is not defined -%}{%- set add_generation_prompt = true -%}"
    "{%- endif -%}"
    "{%- macro text(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
    "{%- for part in content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{{- '<|begin_of_sentence|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{- text(message.content) + '\\n' -}}"
    "{%- elif message.role == 'user' -%}{{- 'User: ' + text(message.content) + '\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- 'Assistant: ' + text(message.content) + '<|end_of_sentence|>' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a
few of its many feed-forward networks, so the model can be large while each step stays cheap.
User: What is the capital of France?
Assistant: The capital of France is Paris. It is known for the Eiffel Tower and the Louvre.
User: Can you write a short poem about the sea?
Assistant: The sea is wide, the sea is deep; it sings the sailors off to sleep.
Numbers and code: 0 1 2 3 4 5 6 7 8 9 10 42 100 2025 3.14159 -7 x = y + 1; print("hello")
def add(a, b):
    return a + b

Tabs\tand  double  spaces, newlines,
and punctuation: (parentheses) [brackets] {braces} "quotes" 'apostrophes' - dashes; colons!
Unicode: café, naïve, Zürich, São Paulo, smörgåsbord, Ελληνικά, русский язык, עברית.
中文：你好，世界！今天天气很好。我们一起学习人工智能和大语言模型。
日本語：こんにちは。カタカナとひらがな。 한국어: 안녕하세요.
Emoji: 🙂 😀 🚀 ❤️ 👍 🎉 and symbols: € £ ¥ © ® ™ ° ± × ÷ → ← ∑ ∞.
Serving a large language model means batching requests, caching keys and values, and
streaming tokens back to the user as soon as they are ready. The router picks the top
experts for each token; shared experts see every token.
"""


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """A byte-level BPE trained on the built-in corpus (deterministic); tokenizer.json text."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,  # ids 0..4, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok.to_str()


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": UNK,
        "cls_token": CLS,
        "sep_token": SEP,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def tokenizer_size() -> int:
    return Tokenizer.from_str(tokenizer_json()).get_vocab_size(with_added_tokens=True)


def is_readable(text: str) -> bool:
    """Non-empty printable text: no U+FFFD, no control characters but newline and tab."""
    return bool(text) and "\ufffd" not in text and all(c.isprintable() or c in "\n\t" for c in text)


@functools.lru_cache(maxsize=1)
def _unreadable_token_ids() -> tuple[int, ...]:
    tok = Tokenizer.from_str(tokenizer_json())
    never = {tok.token_to_id(t) for t in NEVER_EMITTED}
    n = tok.get_vocab_size(with_added_tokens=True)
    return tuple(
        i
        for i in range(n)
        if i in never or not is_readable(tok.decode([i], skip_special_tokens=False))
    )


def suppressed_ids(vocab: int) -> list[int]:
    """Ids a readable_only model never emits: the tokens that do not decode, alone, to
    readable text (partial UTF-8 sequences, control bytes), <unk>, <s>,
    <|begin_of_sentence|>, and the vocab padding past the tokenizer."""
    return [*_unreadable_token_ids(), *range(tokenizer_size(), vocab)]


def _write_tokenizer(out: Path) -> None:
    (out / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": UNK}
    _write_json(out / "special_tokens_map.json", {**specials, "cls_token": CLS, "sep_token": SEP})


def _model_config(a: dict, vocab: int) -> dict:
    layers, hidden = a["layers"], a["hidden"]
    end = layers - 1 if a["moe_end"] == -1 else a["moe_end"]
    return {
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "model_type": "ernie4_5_moe",
        "hidden_size": hidden,
        "intermediate_size": a["intermediate"] or 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": a["heads"],
        "num_key_value_heads": a["kv_heads"],
        "head_dim": a["head_dim"] or hidden // a["heads"],
        "vocab_size": vocab,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": a["tie_word_embeddings"],
        "use_bias": a["use_bias"] or a["readable_only"],  # readable_only: an lm_head bias
        "moe_num_experts": a["experts"],
        "moe_k": a["top_k"],
        "moe_num_shared_experts": a["shared"],
        "moe_intermediate_size": a["moe_intermediate"] or 2 * hidden,
        "moe_layer_start_index": a["moe_start"],
        "moe_layer_end_index": end,
        "moe_layer_interval": a["moe_interval"],
        "moe_norm_min": 1e-12,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "use_cache": True,
        "torch_dtype": a["dtype"],
        "dtype": a["dtype"],
    }


def is_moe_layer(cfg: dict, i: int) -> bool:
    """transformers' rule: every moe_layer_interval-th layer within [start, end]."""
    start, end = cfg["moe_layer_start_index"], cfg["moe_layer_end_index"]
    return (i + 1) % cfg["moe_layer_interval"] == 0 and start <= i <= end


class _Init:
    """Draws tensors in a fixed order from one seeded generator.

    `random_bias`: linear biases are drawn; otherwise they are zeros and draw nothing, so the
    weights equal those of the same seed without biases."""

    def __init__(self, seed: int, dtype: torch.dtype, random_bias: bool = True):
        self.g = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.random_bias = random_bias

    def bias(self, n: int) -> torch.Tensor:
        if self.random_bias:
            return self.normal((n,), BIAS_STD)  # [n]
        return torch.zeros(n, dtype=self.dtype)  # [n]

    def normal(self, shape, std: float, dtype=None) -> torch.Tensor:
        x = torch.randn(shape, generator=self.g, dtype=torch.float32) * std
        return x.to(dtype or self.dtype).contiguous()

    def linear(self, out: int, inp: int) -> torch.Tensor:
        return self.normal((out, inp), LINEAR_GAIN / math.sqrt(inp))  # [out, in]

    def norm(self, n: int) -> torch.Tensor:
        return (1.0 + self.normal((n,), NORM_NOISE, torch.float32)).to(self.dtype)  # [n]


def _proj(init: _Init, t: dict, name: str, out: int, inp: int, bias: bool) -> None:
    t[f"{name}.weight"] = init.linear(out, inp)  # [out, in]
    if bias:
        t[f"{name}.bias"] = init.bias(out)  # [out]


def _mlp(init: _Init, t: dict, p: str, hidden: int, inter: int, bias: bool) -> None:
    _proj(init, t, f"{p}.gate_proj", inter, hidden, bias)  # [inter, H]
    _proj(init, t, f"{p}.up_proj", inter, hidden, bias)  # [inter, H]
    _proj(init, t, f"{p}.down_proj", hidden, inter, bias)  # [H, inter]


def _attention(init: _Init, t: dict, p: str, cfg: dict) -> None:
    h, hd, bias = cfg["hidden_size"], cfg["head_dim"], cfg["use_bias"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    _proj(init, t, f"{p}.q_proj", q, h, bias)  # [heads*hd, H]
    _proj(init, t, f"{p}.k_proj", kv, h, bias)  # [kv*hd, H]
    _proj(init, t, f"{p}.v_proj", kv, h, bias)  # [kv*hd, H]
    _proj(init, t, f"{p}.o_proj", h, q, bias)  # [H, heads*hd]


def _moe(init: _Init, t: dict, p: str, cfg: dict, hot: tuple[int, float] = (0, 0.0)) -> None:
    h, e, inter = cfg["hidden_size"], cfg["moe_num_experts"], cfg["moe_intermediate_size"]
    t[f"{p}.gate.weight"] = init.normal(
        (e, h), GATE_GAIN / math.sqrt(h), torch.float32
    )  # [E, H] fp32
    bias = init.normal((1, e), CORRECTION_STD, torch.float32)  # [1, E], fp32
    bias[0, : hot[0]] += hot[1]  # hot experts: chosen for (almost) every token
    t[f"{p}.moe_statics.e_score_correction_bias"] = torch.where(bias == 0, 1e-3, bias)
    for j in range(e):
        _mlp(init, t, f"{p}.experts.{j}", h, inter, bias=False)  # routed: never a bias
    if cfg["moe_num_shared_experts"] > 0:
        shared = inter * cfg["moe_num_shared_experts"]
        _mlp(init, t, f"{p}.shared_experts", h, shared, cfg["use_bias"])


def _embedding(init: _Init, v: int, h: int, n_tok: int) -> torch.Tensor:
    """[V, H]; rows past the tokenizer (vocab padding) are small, as if never trained."""
    w = init.normal((v, h), EMBED_STD, torch.float32)  # [V, H]
    w[n_tok:] *= PAD_ROW_SCALE
    return w.to(init.dtype)


def _tensors(
    cfg: dict,
    seed: int,
    n_tok: int,
    random_bias: bool,
    suppressed: Sequence[int],
    hot: tuple[int, float] = (0, 0.0),
) -> dict[str, torch.Tensor]:
    """All tensors in Hub key order; the draw order is fixed so a seed pins every byte."""
    init = _Init(seed, getattr(torch, cfg["dtype"]), random_bias)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    t = {"model.embed_tokens.weight": _embedding(init, v, h, n_tok)}  # [V, H]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = init.norm(h)  # [H]
        _attention(init, t, f"{p}.self_attn", cfg)
        t[f"{p}.post_attention_layernorm.weight"] = init.norm(h)  # [H]
        if is_moe_layer(cfg, i):
            _moe(init, t, f"{p}.mlp", cfg, hot)
        else:
            _mlp(init, t, f"{p}.mlp", h, cfg["intermediate_size"], cfg["use_bias"])
    t["model.norm.weight"] = init.norm(h)  # [H]
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = _embedding(init, v, h, n_tok)  # [V, H]
    if cfg["use_bias"]:
        t["lm_head.bias"] = init.bias(v)  # [V]
    if suppressed:
        head = t["lm_head.weight" if "lm_head.weight" in t else "model.embed_tokens.weight"]
        bias = t["lm_head.bias"].float()
        bias += suppression_bias(head, t["model.norm.weight"], bias, suppressed)
        t["lm_head.bias"] = bias.to(init.dtype)
    _mtp(init, t, cfg)
    return t


def suppression_bias(
    head: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor, suppressed: Sequence[int]
) -> torch.Tensor:
    """[V] to add to lm_head.bias: -S on `suppressed`, 0 elsewhere.

    head: lm_head weight [V, H] (the embedding when tied); norm: final RMSNorm weight [H];
    bias: the lm_head bias so far [V]. logit[v] = head[v] . (norm * u) + bias[v], where u is
    the RMS-normalised final hidden state: ||u||^2 = H * ms / (ms + eps) < H for any input. So
    |head[v] . (norm * u)| < ||head[v] * norm|| * sqrt(H), and with
    S = 2 * max_v (||head[v] * norm|| * sqrt(H) + |bias[v]|) + margin, every suppressed logit is
    more than the margin below every other logit, whatever the prompt. 1% slack covers the
    rounding of bf16 weights and activations."""
    w = head.float() * norm.float()  # [V, H]
    reach = w.norm(dim=-1) * math.sqrt(head.shape[1]) + bias.float().abs()  # [V]
    s = 2 * float(reach.max()) * 1.01 + SUPPRESS_MARGIN
    out = torch.zeros(head.shape[0])  # [V]
    out[list(suppressed)] = -s
    return out


def _mtp(init: _Init, t: dict, cfg: dict) -> None:
    """The Hub's multi-token-prediction tensors (a decoder layer, two norms, a projection),
    under `model.mtp_*`; transformers, vLLM and this reader skip them. No biases, as on the Hub."""
    h, p = cfg["hidden_size"], "model.mtp_block.0"
    t[f"{p}.input_layernorm.weight"] = init.norm(h)  # [H]
    _attention(init, t, f"{p}.self_attn", {**cfg, "use_bias": False})
    t[f"{p}.post_attention_layernorm.weight"] = init.norm(h)  # [H]
    _mlp(init, t, f"{p}.mlp", h, cfg["intermediate_size"], bias=False)
    t["model.mtp_emb_norm.0.weight"] = init.norm(h)  # [H]
    t["model.mtp_hidden_norm.0.weight"] = init.norm(h)  # [H]
    t["model.mtp_linear_proj.0.weight"] = init.linear(h, 2 * h)  # [H, 2H]


def _split(sizes: list[int], shards: int) -> list[int]:
    """Contiguous shard index per tensor, balanced by bytes, no shard left empty."""
    total, cum, out = sum(sizes), 0, []
    for i, size in enumerate(sizes):
        k = min(int((cum + size / 2) * shards / total), shards - 1)
        prev = out[-1] if out else -1
        k = max(min(k, prev + 1), prev, shards - (len(sizes) - i))  # no gaps; room for the rest
        out.append(k)
        cum += size
    return out


def _save_weights(t: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    meta = {"format": "pt"}
    if shards == 1:
        save_file(t, str(out / "model.safetensors"), metadata=meta)
        return
    names = list(t)
    sizes = [t[n].numel() * t[n].element_size() for n in names]
    if shards > len(names):
        raise ValueError(f"shards={shards} exceeds the {len(names)} tensors")
    where = _split(sizes, shards)
    files = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    for k, fname in enumerate(files):
        part = {n: t[n] for n, s in zip(names, where) if s == k}
        save_file(part, str(out / fname), metadata=meta)
    weight_map = {n: files[s] for n, s in sorted(zip(names, where))}
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_args(a: dict) -> None:
    if a["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {a['dtype']!r}")
    if not 1 <= a["top_k"] <= a["experts"]:
        raise ValueError(f"top_k={a['top_k']} must be in [1, experts={a['experts']}]")
    if a["heads"] % a["kv_heads"]:
        raise ValueError("heads must be a multiple of kv_heads")
    if a["shards"] < 1 or a["shared"] < 0 or a["moe_interval"] < 1:
        raise ValueError("shards and moe_interval must be >= 1, shared >= 0")
    if not 0 <= a["hot_experts"] <= a["experts"]:
        raise ValueError(f"hot_experts={a['hot_experts']} must be in [0, experts={a['experts']}]")


def make_tiny(
    out_dir, *, seed=0, experts=8, top_k=2, shared=1, layers=4, hidden=64, heads=4,
    kv_heads=2, head_dim=None, intermediate=None, moe_intermediate=None,
    moe_start=1, moe_end=-1, moe_interval=1, vocab=None, dtype="float32",
    tie_word_embeddings=True, use_bias=False, shards=2, readable_only=True, hot_experts=0,
    hot_bias=1.0,
) -> Path:  # fmt: skip
    """Writes a tiny random ERNIE-4.5 MoE checkpoint (Hub layout) into out_dir; returns it.

    readable_only: the model never emits a token that is not readable text on its own (see the
    module docstring); it adds an lm_head bias (and zero biases elsewhere) to the checkpoint.
    hot_experts, hot_bias: experts 0..hot_experts-1 of every MoE layer get hot_bias added to
    their correction bias, so that they are chosen far more often than the rest (with a bias
    of 1 and hot_experts <= top_k, by nearly every token): skewed routing, for expert load
    balancing. The other tensors are those of the same seed without it."""
    args = {k: v for k, v in locals().items() if k != "out_dir"}
    _check_args(args)
    n_tok = tokenizer_size()
    if vocab is None:
        vocab = -(-n_tok // 64) * 64  # round up to a multiple of 64
    elif vocab < n_tok:
        raise ValueError(f"vocab={vocab} is smaller than the tokenizer's {n_tok} tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out)
    cfg = _model_config(args, vocab)
    _write_json(out / "config.json", cfg)
    eos = [2, SPECIAL_TOKENS.index(SEP)]  # the chat turn end stops generation too
    _write_json(
        out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": 0}
    )
    suppressed = suppressed_ids(vocab) if readable_only else []
    hot = (hot_experts, hot_bias)
    _save_weights(_tensors(cfg, seed, n_tok, use_bias, suppressed, hot), out, shards)
    return out

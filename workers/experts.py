"""An expert shard: the routed experts one worker owns, in every MoE layer.

No communication here: a transport hands it token rows and gets pre-summed rows back.

Weights are kept in the form the shard's device computes fastest with, made as each expert is
read (the dense copies are not kept):
- on CPU in float32 or bfloat16 on one torch thread: blocked for the native kernel
  `workers/fused_moe` (the whole layer in one call; ~15% faster than the form below at decode
  sizes in fp32; bf16 weights are widened to fp32 in registers);
- else on CPU (float32 or bfloat16): each expert's [gate; up] and down weights packed for
  oneDNN (`ernie/packed_linear.py`): a decode step's expert matmuls (a few rows each) ran 2-4x
  faster than MKL's;
- elsewhere (CUDA): stacked [E, 2I, H] / [E, H, I] tensors, which the padded bmm uses.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from expertmesh.ernie.checkpoint import CheckpointReader, expert_keys
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.packed_linear import can_pack, linear, pack, unpack
from tqdm import tqdm

from . import fused_moe

log = logging.getLogger(__name__)


def _fused(w13) -> bool:
    """Whether a layer's weights are blocked for the fused kernel (per-expert, its layout)."""
    return not isinstance(w13, torch.Tensor) and len(w13) > 0 and fused_moe.is_blocked(w13[0])


def grouped_swiglu(
    x: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor | Sequence[torch.Tensor],
    w2: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor:
    """Weighted sum over each row's experts of SwiGLU(x_row); one matmul pair per expert present.

    x: [N, H]; local_ids: [N, k] index into w13/w2, -1 where the slot is not ours;
    weights: [N, k]; w13: [E_local, 2I, H] (gate rows, then up rows); w2: [E_local, H, I].
    w13 and w2 may also be lists of per-expert [2I_e, H] / [H, I_e]: experts of several widths,
    or weights packed for oneDNN (CPU), which take the loop below with its kernel, or blocked
    for `fused_moe` (CPU, float32 or bfloat16), which computes the whole call natively.
    Returns [N, H].
    """
    if _fused(w13):
        return fused_moe.fused_swiglu(x, local_ids, weights, w13, w2)
    n, k = local_ids.shape
    flat = local_ids.reshape(-1)  # [N*k]
    keep = (flat >= 0).nonzero().squeeze(-1)  # pairs that are ours
    ids = flat[keep]
    order = torch.argsort(ids, stable=True)
    pair = keep[order]  # (row, slot) pairs grouped by expert
    rows = torch.div(pair, k, rounding_mode="floor")  # [P]
    counts_t = torch.bincount(ids, minlength=len(w13))
    counts = counts_t.tolist()
    if isinstance(w13, torch.Tensor) and 2 * sum(c > 0 for c in counts) > len(counts):
        # most experts present: one padded bmm per weight over [E_local, cap, H]; on CPU fewer,
        # larger GEMMs beat a loop of small ones once most experts' weights are read anyway
        return _padded_swiglu(x, ids[order], pair, rows, counts_t, max(counts), weights, w13, w2)

    xs = x[rows]  # [P, H]
    outs = []
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        seg = xs[start : start + c]  # [c, H]
        gate, up = linear(seg, w13[e]).chunk(2, dim=-1)  # [c, I] each
        outs.append(linear(F.silu(gate) * up, w2[e]))  # [c, H]
        start += c
    out = torch.zeros_like(x)
    if outs:
        y = torch.cat(outs) * weights.reshape(-1)[pair, None].to(x.dtype)  # [P, H]
        out.index_add_(0, rows, y)
    return out


def _padded_swiglu(x, ids, pair, rows, counts, m, weights, w13, w2):
    """grouped_swiglu's sum with rows gathered per expert into [E_local, cap, H]: two bmm.

    cap is 1.5x the mean rows of the experts present (routing is skewed: padding every expert
    to the busiest one's rows wastes compute); an expert's rows past cap take a matmul pair
    of their own.
    """
    e_local, p = w13.shape[0], len(ids)
    present = int((counts > 0).sum())
    cap = min(m, -(-3 * p // (2 * present)))
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(p, device=x.device) - starts[ids]  # row within its expert
    inside = (pos < cap).nonzero().squeeze(-1)
    ids_in, pos_in = ids[inside], pos[inside]
    xs = x[rows]  # [P, H], grouped by expert
    xp = x.new_zeros(e_local, cap, x.shape[1])
    xp[ids_in, pos_in] = xs[inside]
    gate, up = torch.bmm(xp, w13.transpose(1, 2)).chunk(2, dim=-1)  # [E, cap, I] each
    y = torch.empty_like(xs)
    y[inside] = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))[ids_in, pos_in]
    if cap < m:  # the busiest experts' overflow rows
        for e, (s, c) in enumerate(zip(starts.tolist(), counts.tolist())):
            if c > cap:
                seg = xs[s + cap : s + c]
                g, u = F.linear(seg, w13[e]).chunk(2, dim=-1)
                y[s + cap : s + c] = F.linear(F.silu(g) * u, w2[e])
    out = torch.zeros_like(x)
    out.index_add_(0, rows, y * weights.reshape(-1)[pair, None].to(x.dtype))
    return out


@dataclass(frozen=True)
class Done:
    """An expert layer computed already (`ExpertShard.start` where the kernel is not used)."""

    out: torch.Tensor

    def result(self) -> torch.Tensor:
        return self.out


class ExpertShard:
    """Weights of the experts in `experts` for every MoE layer of the model.

    `weights[layer]` holds the shard's text experts (all its experts in a text model),
    `vision_weights[layer]` its vision experts (VL: global ids num_text_experts and up, of
    their own width). Local indices: text experts first, then vision experts, in id order.
    Each is a pair (w13, w2): stacked [E_local, 2I, H] / [E_local, H, I] tensors, or on CPU
    lists of per-expert weights blocked for `fused_moe` or packed for oneDNN (`compute_form`);
    `stacked(layer)` gives the dense stacked form of either.

    The experts held can change while the shard serves (`hold`, for load balancing): what
    `forward` reads is one `_Held`, replaced whole, so a call sees the old set or the new one.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        experts: Sequence[int],
        weights: dict[int, tuple],
        vision_weights: dict[int, tuple] | None = None,
    ):
        self.cfg = cfg
        self._held = _Held.of(cfg, experts, weights, vision_weights or {})
        self._holding = threading.Lock()  # one `hold` at a time

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
        text = [e for e in experts if e < cfg.num_text_experts]
        vision = [e for e in experts if e >= cfg.num_text_experts]
        weights, vision_weights = {}, {}
        layers = tqdm(
            cfg.moe_layers, desc=progress, unit="layer", disable=progress is None, mininterval=1.0
        )
        for layer in layers:
            weights[layer] = _load_group(reader, cfg, layer, text, dtype, device)
            if vision:
                vision_weights[layer] = _load_group(reader, cfg, layer, vision, dtype, device)
        log.info("expert shard loaded %d experts x %d layers", len(experts), len(cfg.moe_layers))
        return cls(cfg, text + vision, weights, vision_weights)

    @property
    def experts(self) -> list[int]:
        """Global ids of the experts held, in local order (text, then vision)."""
        return self._held.experts

    @property
    def weights(self) -> dict[int, tuple]:
        return self._held.weights

    @property
    def vision_weights(self) -> dict[int, tuple]:
        return self._held.vision_weights

    @property
    def device(self) -> torch.device:
        """Where the experts compute."""
        for w13, _ in (*self.weights.values(), *self.vision_weights.values()):
            if len(w13):
                return w13[0].device
        return torch.device("cpu")

    @property
    def nbytes(self) -> int:
        groups = (*self.weights.values(), *self.vision_weights.values())
        return sum(_nbytes(w) for pair in groups for w in pair)

    def stacked(self, layer: int, vision: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense w13 [E, 2I, H] and w2 [E, H, I] of one layer's text (or vision) experts: for
        tools that want them whole; a copy when the shard keeps them packed."""
        w13, w2 = (self.vision_weights if vision else self.weights)[layer]
        if isinstance(w13, torch.Tensor):
            return w13, w2
        return torch.stack([dense(w) for w in w13]), torch.stack([dense(w) for w in w2])

    def forward(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x: [N, H]; expert_ids: [N, k] global ids (-1 = not routed here); weights: [N, k]."""
        return grouped_swiglu(*self._args(layer, x, expert_ids, weights))

    def start(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> Done | fused_moe.Started:
        """`forward` begun on the kernel's helper thread where this shard's weights are blocked
        for it (else computed now); `.result()` is the [N, H] output. Until then the caller
        computes beside it (the shared experts) and leaves x unchanged."""
        args = self._args(layer, x, expert_ids, weights)
        if _fused(args[3]):
            return fused_moe.start_swiglu(*args)
        return Done(grouped_swiglu(*args))

    def _args(self, layer: int, x, expert_ids, weights) -> tuple:
        """grouped_swiglu's arguments for this shard's experts of `layer`."""
        held = self._held  # one consistent set, whatever `hold` does meanwhile
        w13, w2 = held.mixed.get(layer) or held.weights[layer]
        g2l = held.g2l.to(expert_ids.device)
        local = g2l[expert_ids]  # -1 indexes the last entry, which is -1
        missing = None if held.complete else (local < 0) & (expert_ids >= 0)  # [N, k]
        # a placement this shard has not caught up with: never drop rows
        if missing is not None and missing.any():
            raise ValueError(
                f"experts {sorted(set(expert_ids[missing].tolist()))} are not held here "
                f"(this shard holds {held.experts})"
            )
        return x, local, weights, w13, w2

    def hold(self, reader: CheckpointReader, experts: Sequence[int]) -> int:
        """Hold exactly `experts` from now on: read the tensors of those not held yet (only
        theirs), keep the weights of those held already, drop the rest. Calls of `forward`
        meanwhile use the former set. Returns the number of experts read."""
        with self._holding:
            old, n_text = self._held, self.cfg.num_text_experts
            want = sorted(set(experts))
            missing = [e for e in want if e not in old.experts]
            groups = ([e for e in want if e < n_text], [e for e in want if e >= n_text])
            weights, vision_weights = {}, {}
            for layer in self.cfg.moe_layers:
                weights[layer] = self._gather(reader, layer, groups[0], missing)
                if groups[1]:
                    vision_weights[layer] = self._gather(reader, layer, groups[1], missing)
            self._held = _Held.of(self.cfg, [*groups[0], *groups[1]], weights, vision_weights)
        log.info("expert shard holds %d experts now (%d read)", len(want), len(missing))
        return len(missing)

    def _gather(self, reader, layer: int, experts: list[int], missing: list[int]) -> tuple:
        """One layer's (w13, w2) of `experts` (all of one width) in the shard's form: the
        weights of those held as they are, those in `missing` read from the checkpoint."""
        dtype, device = self._form()
        new = [e for e in experts if e in missing]
        read = _load_group(reader, self.cfg, layer, new, dtype, device)
        if not experts:
            return read  # empty tensors of the right width
        held = self._held
        pair = held.mixed.get(layer) or held.weights[layer]  # indexed by local id
        local = dict(zip(held.experts, range(len(held.experts))))
        fresh = dict(zip(new, zip(*read)))  # expert -> (w13 [2I, H], w2 [H, I])
        w13 = [fresh[e][0] if e in fresh else pair[0][local[e]] for e in experts]
        w2 = [fresh[e][1] if e in fresh else pair[1][local[e]] for e in experts]
        if isinstance(read[0], list) or not isinstance(pair[0], torch.Tensor):
            # blocked or packed, one per expert (as `_load_group` makes them)
            return w13, w2
        return torch.stack(w13), torch.stack(w2)  # [n, 2I, H], [n, H, I]

    def _form(self) -> tuple[torch.dtype, torch.device]:
        """The dtype and device of the shard's weights (float32 on CPU when it holds none)."""
        for w13, _ in (*self.weights.values(), *self.vision_weights.values()):
            if len(w13):
                return w13[0].dtype, w13[0].device
        return torch.float32, torch.device("cpu")


@dataclass(frozen=True, eq=False)
class _Held:
    """The experts a shard holds and their weights in compute form, replaced as a whole."""

    experts: list[int]  # global ids in local order: weights' text rows, then vision rows
    g2l: torch.Tensor  # [E + 1] global id -> local index, -1 elsewhere (last entry: for id -1)
    weights: dict  # layer -> (w13, w2) of the text experts
    vision_weights: dict  # layer -> (w13, w2) of the vision experts (their own width)
    mixed: dict  # layer -> per-expert lists, text then vision, as grouped_swiglu takes both
    complete: bool = False  # every expert is held: no routed expert can be missing here

    @classmethod
    def of(cls, cfg: ModelConfig, experts, weights: dict, vision_weights: dict) -> _Held:
        experts = list(experts)
        g2l = torch.full((cfg.num_experts + 1,), -1, dtype=torch.long)
        g2l[torch.tensor(experts, dtype=torch.long)] = torch.arange(len(experts))
        widths = model_widths(cfg)  # one form for text and vision: `mixed` lists both
        weights = {layer: compute_form(*pair, widths) for layer, pair in weights.items()}
        vision = {layer: compute_form(*pair, widths) for layer, pair in vision_weights.items()}
        mixed = {
            layer: tuple([*a, *b] for a, b in zip(weights[layer], v)) for layer, v in vision.items()
        }
        complete = bool((g2l[:-1] >= 0).all())
        return cls(experts, g2l, weights, vision, mixed, complete)


def compute_form(w13, w2, widths: Sequence[int] | None = None) -> tuple:
    """One layer's (w13, w2) as the shard computes with them: lists of per-expert weights in
    `per_expert_form` where there is one; otherwise as given (stacked tensors or lists).
    Blocked or packed weights pass through unchanged. `widths`: every expert width the form
    must take (default: these experts' own)."""
    if len(w13) == 0 or w13[0].is_mkldnn or fused_moe.is_blocked(w13[0]):
        return w13, w2
    widths = list(widths) if widths is not None else [w.shape[1] for w in w2]
    form = per_expert_form(w13[0].dtype, w13[0].device, w2[0].shape[0], widths)
    if form is None:
        return w13, w2
    make13, make2 = form
    return [make13(w) for w in w13], [make2(w) for w in w2]


def per_expert_form(dtype, device, hidden: int, widths: list[int]) -> tuple | None:
    """How each expert's dense w13 [2I, H] and w2 [H, I] become the form they compute in: blocked
    for `fused_moe` where it takes them, else packed for oneDNN where that path is on (CPU,
    float32 or bfloat16); None: stacked tensors (CUDA, other dtypes)."""
    if fused_moe.usable(dtype, device, hidden, widths):
        return fused_moe.block13, fused_moe.block2  # [I/16, 2, H, 16], [H/16, I, 16]
    if can_pack(dtype, device):
        return pack, pack
    return None


def model_widths(cfg: ModelConfig) -> list[int]:
    """Every routed expert width of the model (VL: text and vision). A shard's experts all take
    the form these allow, whichever experts it holds: a VL shard computes its text and vision
    experts in one call, and the kernel cannot take blocked and packed weights together (a
    text width the kernel cannot block beside a vision width it can once failed that way)."""
    return sorted({cfg.expert_width(e) for e in range(cfg.num_experts)})


def dense(w: torch.Tensor) -> torch.Tensor:
    """One expert's dense [2I, H] or [H, I] weight from any per-expert form."""
    return fused_moe.unblock(w) if fused_moe.is_blocked(w) else unpack(w)


def _nbytes(w) -> int:
    ts = [w] if isinstance(w, torch.Tensor) else w
    return sum(t.numel() * t.element_size() for t in ts)


def _load_group(
    reader: CheckpointReader,
    cfg: ModelConfig,
    layer: int,
    experts: list[int],
    dtype: torch.dtype,
    device: str | torch.device,
) -> tuple:
    """Weights of experts of one width: w13 [n, 2I, H] (gate, then up), w2 [n, H, I], stacked,
    or (where `per_expert_form` gives one) lists of per-expert blocked or packed weights, each
    made as soon as it is read so that no dense copy of the shard is ever whole
    in memory."""
    h = cfg.hidden_size
    inter = cfg.expert_width(experts[0]) if experts else cfg.moe_intermediate_size
    form = per_expert_form(dtype, device, h, model_widths(cfg)) if experts else None
    if form is not None:
        make13, make2 = form
        gate_up = torch.empty(2 * inter, h, dtype=dtype, device=device)  # reused: [gate; up]
        out13, out2 = [], []
        for e in experts:
            gate, up, down = _read_expert(reader, cfg, layer, e, dtype)
            gate_up[:inter], gate_up[inter:] = gate, up
            out13.append(make13(gate_up))  # a copy of [2I, H] in its form
            out2.append(make2(down.to(device)))  # [H, I]
        return out13, out2
    w13 = torch.empty(len(experts), 2 * inter, h, dtype=dtype, device=device)
    w2 = torch.empty(len(experts), h, inter, dtype=dtype, device=device)
    for j, e in enumerate(experts):
        gate, up, down = _read_expert(reader, cfg, layer, e, dtype)
        w13[j, :inter], w13[j, inter:], w2[j] = gate, up, down
    return w13, w2


def _read_expert(reader, cfg, layer, expert, dtype) -> tuple[torch.Tensor, ...]:
    """gate [I, H], up [I, H], down [H, I] of one expert."""
    return tuple(
        reader.read(key, shape, dtype) for key, shape in expert_keys(cfg, layer, expert).items()
    )

"""`expertmesh bench eplb`: what expert load balancing does on a checkpoint with hot experts.

On a checkpoint whose correction bias makes a few experts hot (`make-tiny --hot-experts`;
by default a medium one made on the fly, whose hot experts 0..K-1 all sit in worker 0's block
of the contiguous placement), one run measures, per placement: the busiest worker's rows and
(token, expert) pairs over the mean worker's, per MoE-layer exchange (the dispatcher's own
counts), and the decode step time. The placements are the contiguous one, the balanced one
for the load seen in a first decode run (the engine's per-expert counts), and the balanced
one with `--redundant-experts` copies. Every switch between them is a live move (load, switch
between two steps, drop), as `--rebalance-period-s` makes them; the placements take turns
within every repeat, so a busy neighbour slows all of them alike. Decode time per step is
(a `tokens` run - a one-token run) / (tokens - 1), medians over the repeats, as in
`bench engine`. Throughput can only gain where the workers compute in parallel (`grpc`,
`collective`): in-process (`local`) the shards compute one after the other.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from expertmesh.workers.placement import ExpertPlacement, balanced
from pydantic import Field

from ..config import Transport
from .args import EngineArgs
from .bench_engine import MEDIUM, _prompts, _time, engine_run
from .engine_factory import open_engine


class BenchEplbArgs(EngineArgs):
    transport: Transport = Field("grpc", description="how the gateway reaches the expert workers")
    workers: int = Field(2, ge=2, description="expert workers to balance")
    redundant_experts: int = Field(
        2, ge=0, description="extra expert copies of the third placement (0: two placements)"
    )
    batch: list[int] = Field([16, 64], description="batch sizes to measure")
    tokens: int = Field(32, ge=2, description="tokens to generate per sequence")
    prompt_len: int = Field(16, ge=1, description="prompt tokens per sequence")
    repeats: int = Field(3, ge=1, description="timed runs per point (the median is printed)")
    hot_experts: int = Field(
        3, ge=0, description="hot experts of the checkpoint made when --model is not given"
    )
    hot_bias: float = Field(1.0, description="their correction bias boost (make-tiny --hot-bias)")


class _InProcess:
    """Placements and exchange counts of an in-process engine (this thread drives it)."""

    def __init__(self, engine, checkpoint: Path):
        from expertmesh.router.rebalance import Rebalancer, shard_holder

        self.engine = engine
        hold = shard_holder(engine.dispatcher.shards, checkpoint)
        self.rebalancer = Rebalancer(engine.dispatcher, hold, lambda: engine.expert_counts)

    def counts(self) -> list[int]:
        return self.engine.expert_counts.sum(0).tolist()

    def load(self, reset: bool = False) -> dict:
        from expertmesh.router.dispatch import ExchangeLoad

        d = self.engine.dispatcher
        out = {"copies": [list(c) for c in d.placement.copies], **d.load.snapshot()}
        if reset:
            d.load = ExchangeLoad(d.placement.num_shards)
        return out

    def move(self, copies: list[list[int]]) -> None:
        n = self.engine.dispatcher.placement.num_shards
        self.rebalancer.move_now(ExpertPlacement.from_copies(copies, n))

    def compute(self) -> list[float] | None:
        return None  # the shards compute one after the other in this thread: not measured


class _Gateway:
    """The same through a gateway actor (its engine loop makes the moves)."""

    def __init__(self, engine):
        import ray

        self.actor, self.get = engine.handle.actor, ray.get

    def counts(self) -> list[int]:
        return torch.tensor(self.get(self.actor.expert_counts.remote())["counts"]).sum(0).tolist()

    def load(self, reset: bool = False) -> dict:
        return self.get(self.actor.expert_load.remote(reset))

    def move(self, copies: list[list[int]]) -> None:
        self.get(self.actor.move_experts.remote(copies))

    def compute(self) -> list[float]:
        """Each worker's seconds of expert computation so far (its own count)."""
        return [i["compute_s"] for i in self.get(self.actor.worker_infos.remote())]


def placements(load: list[int], initial: list[list[int]], workers: int, redundant: int) -> dict:
    """name -> each expert's workers: the initial placement and the balanced ones."""
    out = {"contiguous": initial}
    out["balanced"] = [list(c) for c in balanced(load, workers, 0).copies]
    copied = balanced(load, workers, redundant)
    if n := copied.num_copies - len(load):  # (none when copies would not balance better)
        out[f"balanced + {n} cop{'y' if n == 1 else 'ies'}"] = [list(c) for c in copied.copies]
    return out


def bench_eplb(a: BenchEplbArgs) -> dict:
    from expertmesh.ernie.config import ModelConfig
    from expertmesh.ernie.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.model) if a.model else None
        if path is None:
            hot = dict(hot_experts=a.hot_experts, hot_bias=a.hot_bias)
            path = make_tiny(Path(tmp) / "medium-hot", **MEDIUM, **hot)
        vocab = ModelConfig.from_dir(path).vocab_size
        cfg = a.cluster_config(path, rebalance_period_s=0, redundant_experts=0)
        with open_engine(cfg) as engine:
            side = _InProcess(engine, path) if cfg.in_process else _Gateway(engine)
            prompts = {b: _prompts(b, a.prompt_len, vocab) for b in a.batch}
            initial = side.load()["copies"]
            for b in a.batch:  # warm-up, and the load that the balanced placements are for
                engine_run(engine, prompts[b])(a.tokens)
            shown = placements(side.counts(), initial, a.workers, a.redundant_experts)
            results = _measure(a, engine, side, shown, prompts)
    _print(a, path, shown, results)
    return {"placements": shown, "results": results}


def _measure(a: BenchEplbArgs, engine, side, shown: dict, prompts: dict) -> dict:
    """(placement, batch) -> decode step seconds, and its decode exchanges (`decode_load`)."""
    full = {(p, b): [] for p in shown for b in a.batch}
    one = {k: [] for k in full}
    loads = {k: [] for k in full}
    for _ in range(a.repeats):
        for name, copies in shown.items():
            side.move(copies)  # a live move, as a rebalancing period makes it
            for b in a.batch:
                run = engine_run(engine, prompts[b])
                side.load(reset=True)
                c0 = side.compute()
                full[name, b].append(_time(run, a.tokens))
                whole, c1 = side.load(reset=True), side.compute()
                one[name, b].append(_time(run, 1))
                loads[name, b].append((whole, side.load(), c0, c1, side.compute()))
    out = {}
    for k in full:
        step = (statistics.median(full[k]) - statistics.median(one[k])) / (a.tokens - 1)
        runs = [decode_load(*run, a.workers, a.tokens - 1) for run in loads[k]]
        out[k] = {"step_s": step, **runs[0]}  # the counts: the same in every repeat
        for t in ("exchange_s", "busiest_s"):  # the times: medians
            if runs[0][t] is not None:
                out[k][t] = statistics.median(r[t] for r in runs)
    return out


def decode_load(whole, prefill, c0, c1, c2, workers: int, steps: int) -> dict:
    """Per decode step: max/mean rows and pairs per exchange, the exchanges' time, and the
    busiest worker's expert computation time (a run's counts less its prefill's, the
    one-token run's; c0, c1, c2: the workers' compute seconds before, between, after)."""
    out = {"exchange_s": (whole["seconds"] - prefill["seconds"]) / steps, "busiest_s": None}
    if c0 is not None:
        decode = [(b - a) - (c - b) for a, b, c in zip(c0, c1, c2)]
        out["busiest_s"] = max(decode) / steps
    for what in ("rows", "pairs"):
        total = sum(whole[what]) - sum(prefill[what])
        most = whole[f"max_{what}"] - prefill[f"max_{what}"]
        out[f"{what}_max_over_mean"] = most * workers / total if total else 1.0
    return out


def _print(a: BenchEplbArgs, path: Path, shown: dict, results: dict) -> None:
    model = a.model or (
        "medium "
        + ", ".join(f"{k}={v}" for k, v in MEDIUM.items())
        + f", hot_experts={a.hot_experts} (bias +{a.hot_bias})"
    )
    print(
        f"# bench eplb: {model}; transport={a.transport} workers={a.workers} "
        f"tokens={a.tokens} prompt={a.prompt_len} repeats={a.repeats}"
    )
    print(
        "| placement | batch | rows max/mean | pairs max/mean | busiest worker's experts "
        "ms/step | MoE exchanges ms/step | step ms | tok/s | vs contiguous |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b in a.batch:
        base = results["contiguous", b]["step_s"]
        for name in shown:
            r = results[name, b]
            busiest = "-" if r["busiest_s"] is None else f"{1e3 * r['busiest_s']:.1f}"
            print(
                f"| {name} | {b} | {r['rows_max_over_mean']:.2f} | "
                f"{r['pairs_max_over_mean']:.2f} | {busiest} | {1e3 * r['exchange_s']:.1f} | "
                f"{1e3 * r['step_s']:.1f} | "
                f"{b / r['step_s']:.1f} | {base / r['step_s']:.2f}x |"
            )
    print()
    for name, copies in shown.items():
        held = [[e for e, c in enumerate(copies) if w in c] for w in range(a.workers)]
        print(f"- {name}: " + "; ".join(f"worker {w}: {h}" for w, h in enumerate(held)))

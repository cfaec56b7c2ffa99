"""`expertmesh bench engine`: decode throughput of the engine against a baseline, in one run.

Decode time is the time of a generate run of `tokens` tokens minus that of a one-token run
(the prefill), so both sides are measured the same way. Numbers are medians of `repeats`.
With the transformers baseline, the engine's and transformers' runs alternate within every
repeat (engine, transformers, engine, ...), so a busy neighbour on a shared machine slows
both alike instead of whichever side happened to run during it. Both run in this process,
with the same torch threads, dtype (the engine's, float32 on CPU), prompts and lengths;
transformers greedy (`do_sample=False`) with its KV cache, exactly `tokens` new tokens.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from expertmesh.router.dispatch import time_exchange
from expertmesh.router.sampling import SamplingParams

from .args import BenchEngineArgs
from .engine_factory import open_engine

MEDIUM = dict(hidden=512, layers=8, heads=8, kv_heads=2, experts=16, top_k=4, shared=2, seed=0)


def _time(run, n: int) -> float:
    t0 = time.perf_counter()
    run(n)
    return time.perf_counter() - t0


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(5, min(vocab, 400), (batch, length), generator=g).tolist()


def alternating_step_ms(
    engine,
    sides: dict[str, Callable[[], None]],
    batch: int,
    prompt_len: int,
    blocks: int,
    steps: int,
) -> dict[str, float]:
    """Decode-step ms of one engine with `batch` sequences decoding, under each of `sides` (a
    function that switches the engine to that side): the sides take turns in blocks of `steps`
    steps, so that a noisy neighbour slows them alike; the median of each side's block medians."""  # fmt: skip
    g = torch.Generator().manual_seed(batch)
    vocab = engine.model_cfg.vocab_size
    params = SamplingParams(
        max_tokens=blocks * len(sides) * (steps + 1) + 8, temperature=0, ignore_eos=True
    )
    for i in range(batch):
        prompt = torch.randint(5, vocab, (prompt_len,), generator=g).tolist()
        engine.add_request(f"alt{batch}-{i}", prompt, params)
    while engine.num_waiting or any(s.num_generated == 0 for s in engine.scheduler.running):
        engine.step()  # every prompt in, every sequence decoding
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(blocks):
        for name, switch in sides.items():
            switch()
            engine.step()  # the first step after a switch is not timed
            ts = []
            for _ in range(steps):
                t = time.perf_counter()
                engine.step()
                ts.append(time.perf_counter() - t)
            times[name].append(statistics.median(ts) * 1e3)
    for rid in list(engine.requests):
        engine.abort(rid)
    return {name: statistics.median(ms) for name, ms in times.items()}


def engine_run(engine, prompts):
    """run(n): generate n tokens per prompt with the engine (greedy, no early stop)."""

    def run(n):
        engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    return run


def hf_run(model, prompts):
    """run(n): transformers' generate of exactly n new tokens per prompt (greedy, KV cache)."""
    ids = torch.tensor(prompts)

    def run(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    return run


def decode_times(runs: dict, tokens: int, repeats: int) -> dict[str, float]:
    """Seconds per decode step of each side: (median time of a `tokens` run - median of a
    one-token run) / (tokens - 1). The sides take turns within each repeat."""
    for run in runs.values():
        run(2)  # warm-up
    full = {side: [] for side in runs}
    one = {side: [] for side in runs}
    for _ in range(repeats):
        for side, run in runs.items():
            full[side].append(_time(run, tokens))
            one[side].append(_time(run, 1))
    return {
        side: (statistics.median(full[side]) - statistics.median(one[side])) / (tokens - 1)
        for side in runs
    }


def _exchange_times(engine, rows: list[int], repeats: int) -> dict[int, float]:
    if hasattr(engine, "handle"):  # a gateway actor: measure where the dispatcher lives
        import ray

        return ray.get(engine.handle.actor.bench_exchange.remote(rows, repeats))
    dtype = next(engine.model.parameters()).dtype
    return {r: time_exchange(engine.dispatcher, engine.model_cfg, r, repeats, dtype) for r in rows}


def _measure(engine, a: BenchEngineArgs, vocab: int, hf_model=None) -> tuple[dict, dict]:
    """The engine's decode step time per batch (and transformers', when given a model)."""
    out = {"decode": {}, "exchange": _exchange_times(engine, a.exchange_rows, a.repeats)}
    hf = {}
    for b in a.batch:
        prompts = _prompts(b, a.prompt_len, vocab)
        runs = {"engine": engine_run(engine, prompts)}
        if hf_model is not None:
            runs["transformers"] = hf_run(hf_model, prompts)
        times = decode_times(runs, a.tokens, a.repeats)
        out["decode"][b] = times["engine"]
        if hf_model is not None:
            hf[b] = times["transformers"]
    return out, hf


def bench_engine(a: BenchEngineArgs) -> dict:
    from expertmesh.ernie.config import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.model) if a.model else _medium(tmp)
        vocab = ModelConfig.from_dir(path).vocab_size
        with_hf = a.baseline == "transformers" and len(a.transport) == 1
        hf_model = _hf_model(path) if with_hf else None
        results, hf = {}, {}
        for t in a.transport:
            with open_engine(a.cluster_config(path, transport=t)) as engine:
                results[t], hf_t = _measure(engine, a, vocab, hf_model)
                hf.update(hf_t)
        _print(a, results, hf)
        return {"transports": results, "transformers": hf}


def _medium(tmp: str) -> Path:
    from expertmesh.ernie.tiny import make_tiny

    return make_tiny(Path(tmp) / "medium", **MEDIUM)


def _hf_model(path: Path):
    from transformers import Ernie4_5_MoeForCausalLM

    return Ernie4_5_MoeForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _print(a: BenchEngineArgs, results: dict, hf: dict) -> None:
    model = a.model or "medium " + ", ".join(f"{k}={v}" for k, v in MEDIUM.items())
    print(
        f"# bench engine: {model}; workers={a.workers} tokens={a.tokens} "
        f"prompt={a.prompt_len} threads={torch.get_num_threads()}"
    )
    base = results.get("local")
    print(
        "| transport | batch | step ms | tok/s | step vs in-process |"
        + (" transformers tok/s | engine / transformers |" if hf else "")
    )
    print("|---|---|---|---|---|" + ("---|---|" if hf else ""))
    for t, r in results.items():
        for b, step in r["decode"].items():
            ratio = f"{step / base['decode'][b]:.2f}x" if base else "-"
            line = f"| {t} | {b} | {1e3 * step:.1f} | {b / step:.1f} | {ratio} |"
            if hf:
                line += f" {b / hf[b]:.1f} | {hf[b] / step:.2f}x |"
            print(line)
    print()
    print("| transport | exchange rows | one MoE-layer exchange, us | vs in-process |")
    print("|---|---|---|---|")
    for t, r in results.items():
        for rows, sec in r["exchange"].items():
            ratio = f"{sec / base['exchange'][rows]:.2f}x" if base else "-"
            print(f"| {t} | {rows} | {1e6 * sec:.0f} | {ratio} |")

"""`expertmesh bench engine`: decode throughput of the engine against a baseline, in one run.

Decode time is the time of a generate run of `tokens` tokens minus that of a one-token run
(the prefill), so both sides are measured the same way. Numbers are medians of `repeats`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from expertmesh.router.dispatch import time_exchange
from expertmesh.router.sampling import SamplingParams

from .args import BenchEngineArgs
from .engine_factory import open_engine

MEDIUM = dict(hidden=512, layers=8, heads=8, kv_heads=2, experts=16, top_k=4, shared=2, seed=0)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(5, min(vocab, 400), (batch, length), generator=g).tolist()


def engine_decode_time(engine, prompts, tokens: int, repeats: int) -> float:
    def run(n):
        return lambda: engine.generate(
            prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        )

    run(2)()  # warm-up
    return _median_time(run(tokens), repeats) - _median_time(run(1), repeats)


def hf_decode_time(model, prompts, tokens: int, repeats: int) -> float:
    ids = torch.tensor(prompts)

    def run(n):
        def go():
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        return go

    run(2)()
    return _median_time(run(tokens), repeats) - _median_time(run(1), repeats)


def _exchange_times(engine, rows: list[int], repeats: int) -> dict[int, float]:
    if hasattr(engine, "handle"):  # a gateway actor: measure where the dispatcher lives
        import ray

        return ray.get(engine.handle.actor.bench_exchange.remote(rows, repeats))
    dtype = next(engine.model.parameters()).dtype
    return {r: time_exchange(engine.dispatcher, engine.model_cfg, r, repeats, dtype) for r in rows}


def _measure(engine, a: BenchEngineArgs, vocab: int) -> dict:
    out = {"decode": {}, "exchange": _exchange_times(engine, a.exchange_rows, a.repeats)}
    for b in a.batch:
        prompts = _prompts(b, a.prompt_len, vocab)
        out["decode"][b] = engine_decode_time(engine, prompts, a.tokens, a.repeats) / (a.tokens - 1)
    return out


def bench_engine(a: BenchEngineArgs) -> dict:
    from expertmesh.ernie.config import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.model) if a.model else _medium(tmp)
        vocab = ModelConfig.from_dir(path).vocab_size
        results = {}
        for t in a.transport:
            with open_engine(a.cluster_config(path, transport=t)) as engine:
                results[t] = _measure(engine, a, vocab)
        hf = {}
        if a.baseline == "transformers" and len(a.transport) == 1:
            model = _hf_model(path)
            for b in a.batch:
                t_hf = hf_decode_time(model, _prompts(b, a.prompt_len, vocab), a.tokens, a.repeats)
                hf[b] = t_hf / (a.tokens - 1)
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

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
from expertmesh.router.sampling import SamplingParams

from .args import BenchEngineArgs
from .engines import open_engine

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


def bench_engine(a: BenchEngineArgs) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.model) if a.model else _medium(tmp)
        rows = []
        hf = _hf_model(path) if a.baseline == "transformers" else None
        with open_engine(path, a) as engine:
            vocab = engine.model_cfg.vocab_size
            for b in a.batch:
                prompts = _prompts(b, a.prompt_len, vocab)
                steps = b * (a.tokens - 1)
                t_eng = engine_decode_time(engine, prompts, a.tokens, a.repeats)
                row = {
                    "batch": b,
                    "engine_tok_s": steps / t_eng,
                    "step_ms": 1e3 * t_eng / (a.tokens - 1),
                }
                if hf is not None:
                    t_hf = hf_decode_time(hf, prompts, a.tokens, a.repeats)
                    row["hf_tok_s"] = steps / t_hf
                    row["ratio"] = t_hf / t_eng
                rows.append(row)
        _print(a, path, rows)
        return rows


def _medium(tmp: str) -> Path:
    from expertmesh.ernie.tiny import make_tiny

    return make_tiny(Path(tmp) / "medium", **MEDIUM)


def _hf_model(path: Path):
    from transformers import Ernie4_5_MoeForCausalLM

    return Ernie4_5_MoeForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _print(a: BenchEngineArgs, path: Path, rows: list[dict]) -> None:
    print(
        f"# bench engine: model={a.model or 'medium ' + str(MEDIUM)} transport={a.transport} "
        f"workers={a.workers} tokens={a.tokens} prompt={a.prompt_len} threads={torch.get_num_threads()}"
    )
    head = "| batch | engine tok/s | engine step ms |"
    if a.baseline == "transformers":
        head += " transformers tok/s | engine / transformers |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = f"| {r['batch']} | {r['engine_tok_s']:.1f} | {r['step_ms']:.1f} |"
        if "ratio" in r:
            line += f" {r['hf_tok_s']:.1f} | {r['ratio']:.2f}x |"
        print(line)

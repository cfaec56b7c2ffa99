"""Memory bandwidth for one process and for several at once, and the decode step it bounds.

    python scripts/bench_bandwidth.py                    # the medium config (vLLM harness's)
    python scripts/bench_bandwidth.py --model DIR --procs 1 2 3

Why: at small batch a decode step reads every weight it uses once and does little arithmetic
on it, so its floor is (weight bytes read per step) / (memory bandwidth). Expert parallelism
on one machine helps only as far as more processes read more bytes per second: each process
here streams a buffer larger than the last-level cache on one torch thread, all of them at
once (started together behind a barrier), and the script prints each one's GB/s and the sum.
Then it prints the weight bytes of one decode step at batch 1 (fp32, top-k routed experts)
and the floor that each total bandwidth gives.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch

# the vLLM harness's medium checkpoint (make-tiny hidden 512, 8 layers, 16 experts top-4)
MEDIUM = {
    "model_type": "ernie4_5_moe", "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 448,
    "moe_num_experts": 16, "moe_k": 4, "moe_num_shared_experts": 2,
    "moe_intermediate_size": 1024, "moe_layer_start_index": 1, "moe_layer_end_index": 7,
}  # fmt: skip


def _stream(mb: int, seconds: float, core: int, barrier, out) -> None:
    torch.set_num_threads(1)
    os.sched_setaffinity(0, [core])
    buf = torch.ones(mb * 2**20 // 4)  # [mb MiB / 4] fp32, far beyond the caches
    buf.sum()  # fault the pages in
    barrier.wait()
    reads, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        buf.sum()
        reads += 1
    out.put(reads * buf.numel() * 4 / (time.perf_counter() - t0))


def bandwidth(procs: int, mb: int, seconds: float) -> list[float]:
    """Bytes/s of each of `procs` processes streaming at the same time (one core each)."""
    ctx = mp.get_context("spawn")
    cores = sorted(os.sched_getaffinity(0))
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    ps = [
        ctx.Process(target=_stream, args=(mb, seconds, cores[i % len(cores)], barrier, out))
        for i in range(procs)
    ]
    for p in ps:
        p.start()
    rates = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return rates


def step_bytes(cfg, batch: int = 1, itemsize: int = 4) -> dict[str, int]:
    """Weight bytes one decode step reads at `batch` tokens, by part (routed: distinct experts
    at most batch * top_k per layer)."""
    h = cfg.hidden_size
    attn = h * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q, k, v, o
    moe = len(cfg.moe_layers)
    dense = cfg.num_layers - moe
    routed = min(cfg.num_text_experts, batch * cfg.top_k) * 3 * h * cfg.moe_intermediate_size
    parts = {
        "attention": cfg.num_layers * attn,
        "dense MLP": dense * 3 * h * cfg.intermediate_size,
        "gate": moe * h * cfg.num_text_experts,
        "shared experts": moe * 3 * h * cfg.moe_intermediate_size * cfg.num_shared_experts,
        "routed experts": moe * routed,
        "lm_head": cfg.vocab_size * h,
    }
    return {k: v * itemsize for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir (its config.json); default: medium")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mb", type=int, default=512, help="MiB each process streams")
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    from expertmesh.ernie.config import ModelConfig

    cfg = ModelConfig.from_dir(a.model) if a.model else ModelConfig.from_dict(MEDIUM)
    parts = step_bytes(cfg)
    total = sum(parts.values())
    print(f"weights read by one decode step at batch 1 (fp32): {total / 1e6:.0f} MB")
    for k, v in parts.items():
        print(f"  {k:15s} {v / 1e6:7.1f} MB")
    print("| processes at once | GB/s each | GB/s together | vs one | step floor ms |")
    print("|---|---|---|---|---|")
    one = None
    for n in a.procs:
        rates = bandwidth(n, a.mb, a.seconds)
        together = sum(rates)
        one = one or together / n
        each = " / ".join(f"{r / 1e9:.1f}" for r in rates)
        print(
            f"| {n} | {each} | {together / 1e9:.1f} | {together / one:.2f}x "
            f"| {1e3 * total / together:.1f} |"
        )


if __name__ == "__main__":
    main()

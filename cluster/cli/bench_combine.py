"""What a worker gains by computing several gateways' exchanges together (M gateways : N workers).

Why: with M gateways sharing the experts, each MoE layer of each step brings a worker M
exchanges. Computed one after another, every exchange reads the worker's expert weights again;
computed together (`workers/combine.py`), the weights are read once for the combined rows. In
decode that is the difference between M weight reads and one, so this measures, at the real
ERNIE-4.5-21B-A3B expert shapes (hidden 2560, expert width 1536, top-6 of 64, split over
`--workers` workers), one worker's time for M exchanges of R rows each: separately, and
combined, and the ratio.

    python -m expertmesh.cluster.cli.bench_combine [--device cuda] [--gateways 1 2 4] [--rows 8 32]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.tiny import make_tiny
from expertmesh.workers.combine import Combiner
from expertmesh.workers.experts import ExpertShard
from expertmesh.workers.placement import ExpertPlacement

from .bench_gpu import REAL, TINY, make_sync, median_time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="expertmesh.cluster.cli.bench_combine", description=__doc__)
    p.add_argument("--gateways", type=int, nargs="+", default=[1, 2, 4], help="exchanges per layer")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32], help="tokens per exchange")
    p.add_argument("--workers", type=int, default=2, help="workers the experts are split over")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats (median)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a quick CPU check)")
    return p.parse_args(argv)


def exchanges(
    cfg: ModelConfig, m: int, rows: int, device, dtype, held: list[int], seed: int = 0
) -> list[tuple]:
    """m exchanges of `rows` tokens, routed uniformly at random over all experts; the ids of
    experts not `held` by the worker are -1, as a dispatcher sends them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(m):
        x = torch.randn(rows, cfg.hidden_size, generator=g).to(device, dtype)  # [R, H]
        scores = torch.rand(rows, cfg.num_experts, generator=g)
        ids = scores.topk(cfg.top_k, dim=-1).indices  # [R, k]
        ids = torch.where(torch.isin(ids, torch.tensor(held)), ids, -1).to(device)
        weights = torch.rand(rows, cfg.top_k, generator=g).to(device, dtype)  # [R, k]
        out.append((x, ids, weights))
    return out


def main(argv=None) -> None:
    a = parse_args(argv)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    sync = make_sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        shapes = TINY if a.tiny else REAL
        path = make_tiny(tmp, seed=0, layers=2, dtype=a.dtype, shards=1, **shapes)
        cfg = ModelConfig.from_dir(path)
        experts = ExpertPlacement.contiguous(cfg.num_experts, a.workers).experts_of(0)
        with CheckpointReader(path) as reader:
            shard = ExpertShard.load(reader, cfg, experts, dtype, device)
    layer = cfg.moe_layers[0]
    print(
        f"# one worker of {a.workers} ({len(experts)} of {cfg.num_experts} experts, hidden "
        f"{cfg.hidden_size}, width {cfg.moe_intermediate_size}, top-{cfg.top_k}), {a.dtype} on "
        f"{device}: time of one MoE layer's exchanges from M gateways\n"
    )
    print("| rows per exchange | gateways (M) | separately ms | combined ms | speed-up |")
    print("|---|---|---|---|---|")
    combiner = Combiner(shard)
    with torch.inference_mode():
        for rows in a.rows:
            for m in a.gateways:
                parts = exchanges(cfg, m, rows, device, dtype, experts)

                def separately(parts=parts):
                    for x, ids, w in parts:
                        shard.forward(layer, x, ids, w)

                def combined(parts=parts):
                    combiner.compute(layer, parts)

                separately(), combined()  # warm-up
                t_sep = median_time(separately, a.repeats, sync)
                t_comb = median_time(combined, a.repeats, sync)
                print(
                    f"| {rows} | {m} | {1e3 * t_sep:.3f} | {1e3 * t_comb:.3f} | "
                    f"{t_sep / t_comb:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

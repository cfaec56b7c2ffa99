"""A decode step's attention through the native kernel or through torch, per layer and per step.

    python scripts/bench_decode_attention.py                # the medium config, batches 1 8 32
    python scripts/bench_decode_attention.py --model DIR --batch 1 16 --context 512 --prompt-len 1024

One torch thread, fp32. First one layer's attention alone (`layers.Attention` without its
projections: rotary, cache writes, attention over a paged cache) at each batch and context
length, the kernel against the torch path; then one engine (`--transport local`) whose decode
steps switch `EXPERTMESH_DECODE_ATTENTION` off and on in alternating blocks of steps, so that
both sides see the same neighbours. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

import torch

SETTING = "EXPERTMESH_DECODE_ATTENTION"


def _layer_us(fn, repeats: int = 200) -> float:
    for _ in range(5):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e6


def bench_layer(batch: int, context: int, heads: int, kv_heads: int, d: int) -> tuple[float, float]:
    """(kernel us, torch us) of one layer's decode attention."""
    from expertmesh.router import decode_attention
    from expertmesh.router.attention_metadata import build_step
    from expertmesh.router.layers import Attention, Rotary, rotation
    from expertmesh.router.scheduler import ScheduledSeq

    block_size, g = 16, torch.Generator().manual_seed(batch * 7 + context)
    nblk = -(-context // block_size)
    slots = batch * nblk * block_size
    caches = [torch.randn(slots, kv_heads, d, generator=g) for _ in range(2)]
    perm = torch.randperm(batch * nblk, generator=g).view(batch, nblk)

    class _Seq:  # what build_step reads of a sequence
        def __init__(self, table):
            self.num_computed, self.block_table = context - 1, table
            self.token_ids = [0] * context

    plan = [ScheduledSeq(_Seq(perm[i].tolist()), 1) for i in range(batch)]
    _, meta = build_step(plan, block_size)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * d, generator=g)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    rope = rotation(*Rotary(d, 10000.0)(meta.positions))
    attn = Attention.__new__(Attention)  # its attention math only, no projections
    attn.heads, attn.kv_heads, attn.head_dim = heads, kv_heads, d
    group = meta.groups[0]

    def kernel():
        decode_attention.decode_attention(
            q, k, v, rope, meta.slot_mapping, *caches, group.kv_blocks, group.context_lens,
            block_size,
        )  # fmt: skip

    def reference():
        from expertmesh.router.layers import apply_rotary

        qr = apply_rotary(q.reshape(batch, heads, d), rope)
        kr = apply_rotary(k.reshape(batch, kv_heads, d), rope)
        caches[0].index_copy_(0, meta.slot_mapping, kr)
        caches[1].index_copy_(0, meta.slot_mapping, v.reshape(batch, kv_heads, d))
        attn._attend(qr, *caches, group)

    return _layer_us(kernel), _layer_us(reference)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir; default: the medium config, made here")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--prompt-len", type=int, default=64, help="of the engine's requests")
    ap.add_argument("--blocks", type=int, default=6, help="blocks per side")
    ap.add_argument("--steps", type=int, default=12, help="steps per block")
    a = ap.parse_args()
    torch.set_num_threads(1)

    from expertmesh.cluster.cli.bench_engine import MEDIUM, alternating_step_ms
    from expertmesh.cluster.cli.engine_factory import open_engine
    from expertmesh.cluster.config import ClusterConfig
    from expertmesh.ernie.config import ModelConfig
    from expertmesh.ernie.tiny import make_tiny
    from expertmesh.router import decode_attention

    if decode_attention.library() is None:
        raise SystemExit("the kernel did not build (see the warning above)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.model) if a.model else make_tiny(Path(tmp) / "medium", **MEDIUM)
        mc = ModelConfig.from_dir(path)
        print(f"one layer ({mc.num_heads}/{mc.num_kv_heads} heads of {mc.head_dim}):")
        print("| batch | context | kernel us | torch us | torch / kernel |\n|---|---|---|---|---|")
        for b in a.batch:
            for c in a.context:
                kern, ref = bench_layer(b, c, mc.num_heads, mc.num_kv_heads, mc.head_dim)
                print(f"| {b} | {c} | {kern:.1f} | {ref:.1f} | {ref / kern:.2f}x |", flush=True)

        cfg = ClusterConfig(model=str(path), transport="local", workers=1)
        with open_engine(cfg) as engine:
            print(f"\ndecode step, {a.prompt_len}-token prompts:")
            print("| batch | torch ms | kernel ms | torch / kernel |\n|---|---|---|---|")
            for b in a.batch:
                sides = {on: functools.partial(os.environ.__setitem__, SETTING, on) for on in "01"}
                ms = alternating_step_ms(engine, sides, b, a.prompt_len, a.blocks, a.steps)
                off, on = ms["0"], ms["1"]
                print(f"| {b} | {off:.2f} | {on:.2f} | {off / on:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

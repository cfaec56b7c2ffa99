"""The in-process decode step with the routed experts on the kernel's helper thread, or not.

    python scripts/bench_overlap.py                 # the medium config, batches 1 8 32
    python scripts/bench_overlap.py --model DIR --batch 1 16

One engine (`--transport local`, one torch thread, fp32, the fused-MoE kernel), its
`LocalDispatcher.overlap` switched off and on in alternating blocks of steps, so that both
sides see the same neighbours; every layer goes through the helper when on (`overlap_rows` 1,
the default).
Prints the median of the blocks' median step times and their ratio. What a second core adds
depends on the memory bandwidth it brings (`scripts/bench_bandwidth.py`).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir; default: the medium config, made here")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--blocks", type=int, default=6, help="blocks per side")
    ap.add_argument("--steps", type=int, default=12, help="steps per block")
    a = ap.parse_args()
    torch.set_num_threads(1)

    from expertmesh.cluster.cli.bench_engine import MEDIUM, alternating_step_ms
    from expertmesh.cluster.cli.engine_factory import open_engine
    from expertmesh.cluster.config import ClusterConfig
    from expertmesh.ernie.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.model) if a.model else make_tiny(Path(tmp) / "medium", **MEDIUM)
        cfg = ClusterConfig(model=str(path), transport="local", workers=1)
        with open_engine(cfg) as engine:
            dispatcher = engine.dispatcher
            sides = {
                on: functools.partial(setattr, dispatcher, "overlap", on) for on in (False, True)
            }
            print("| batch | helper off ms | helper on ms | off / on |\n|---|---|---|---|")
            for b in a.batch:
                ms = alternating_step_ms(engine, sides, b, 64, a.blocks, a.steps)
                off, on = ms[False], ms[True]
                print(f"| {b} | {off:.2f} | {on:.2f} | {off / on:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

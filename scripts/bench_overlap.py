"""The in-process decode step with the routed experts on the kernel's helper thread, or not.

    python scripts/bench_overlap.py                 # the medium config, batches 1 8 32
    python scripts/bench_overlap.py --model DIR --batch 1 16

One engine (`--transport local`, one torch thread, fp32, the fused-MoE kernel), its
`LocalDispatcher.overlap` switched off and on in alternating blocks of steps, so that both
sides see the same neighbours; every layer goes through the helper when on (overlap_rows 1).
Prints the median of the blocks' median step times and their ratio. What a second core adds
depends on the memory bandwidth it brings (`scripts/bench_bandwidth.py`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
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

    from expertmesh.cluster.cli.bench_engine import MEDIUM
    from expertmesh.cluster.cli.engine_factory import open_engine
    from expertmesh.cluster.config import ClusterConfig
    from expertmesh.ernie.tiny import make_tiny
    from expertmesh.router.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.model) if a.model else make_tiny(Path(tmp) / "medium", **MEDIUM)
        cfg = ClusterConfig(model=str(path), transport="local", workers=1)
        with open_engine(cfg) as engine:
            dispatcher = engine.dispatcher
            dispatcher.overlap_rows = 1
            steps = a.blocks * 2 * (a.steps + 1) + 8
            vocab = engine.model_cfg.vocab_size
            print("| batch | helper off ms | helper on ms | off / on |\n|---|---|---|---|")
            for b in a.batch:
                g = torch.Generator().manual_seed(b)
                params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
                for i in range(b):
                    prompt = torch.randint(5, vocab, (64,), generator=g).tolist()
                    engine.add_request(f"b{b}-{i}", prompt, params)
                while engine.num_waiting or any(
                    s.num_generated == 0 for s in engine.scheduler.running
                ):
                    engine.step()
                blocks = {False: [], True: []}
                for _ in range(a.blocks):
                    for on in (False, True):
                        dispatcher.overlap = on
                        engine.step()
                        ts = []
                        for _ in range(a.steps):
                            t = time.perf_counter()
                            engine.step()
                            ts.append(time.perf_counter() - t)
                        blocks[on].append(statistics.median(ts) * 1e3)
                off, on = (statistics.median(blocks[k]) for k in (False, True))
                print(f"| {b} | {off:.2f} | {on:.2f} | {off / on:.2f}x |", flush=True)
                for rid in list(engine.requests):
                    engine.abort(rid)


if __name__ == "__main__":
    main()

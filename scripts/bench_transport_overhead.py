"""What one MoE-layer exchange costs in CPU, by transport, with next to no expert compute.

Why: on a small machine the gateway and the expert workers share the cores, so the CPU a
transport burns per exchange is taken from the experts' compute. This measures it apart from
the compute: two expert workers, each in a process of its own on 127.0.0.1 serving a shard of
a tiny checkpoint (hidden 512, experts 64 wide: microseconds of compute), and the project's
own dispatcher for each transport in this process. One exchange = the rows of one token to
both workers and their results back, as in a decode step at one stream.

Printed per transport: the wall time of an exchange (median) and the CPU time spent per
exchange by the gateway (this process, all its threads) and by each worker process.

    python scripts/bench_transport_overhead.py [--exchanges 2000] [--transports local tcp grpc]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.tiny import make_tiny
from expertmesh.router.dispatch import LocalDispatcher
from expertmesh.router.grpc_dispatch import GrpcDispatcher
from expertmesh.router.tcp_dispatch import TcpDispatcher
from expertmesh.workers.experts import ExpertShard
from expertmesh.workers.placement import ExpertPlacement

WORKERS = 2
TINY = dict(hidden=512, heads=8, kv_heads=2, layers=2, experts=16, top_k=4, shared=0,
            moe_intermediate=64, shards=1)  # fmt: skip


def serve(transport: str, ckpt: Path, worker: int) -> None:
    """A worker process: load the shard, print the port, serve until stdin closes."""
    torch.set_num_threads(1)
    cfg = ModelConfig.from_dir(ckpt)
    experts = ExpertPlacement.contiguous(cfg.num_experts, WORKERS).experts_of(worker)
    with CheckpointReader(ckpt) as reader:
        shard = ExpertShard.load(reader, cfg, experts, torch.float32)
    if transport == "grpc":
        from expertmesh.workers.grpc_server import start_expert_server

        server, port = start_expert_server(shard, worker)
    else:
        from expertmesh.workers.tcp_server import ExpertTcpServer

        server = ExpertTcpServer(shard, worker)
        port = server.port
    print(port, flush=True)
    sys.stdin.read()  # until the parent closes it


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def measure_local(ckpt: Path, exchanges: int) -> dict:
    """The same exchange with both shards in this process (no transport): the dispatcher's and
    the shards' own cost, on this thread alone (no helper thread)."""
    cfg = ModelConfig.from_dir(ckpt)
    placement = ExpertPlacement.contiguous(cfg.num_experts, WORKERS)
    with CheckpointReader(ckpt) as reader:
        shards = [
            ExpertShard.load(reader, cfg, placement.experts_of(w), torch.float32)
            for w in range(WORKERS)
        ]
    return run_exchanges(LocalDispatcher(placement, shards, overlap=False), cfg, exchanges, [])


def run_exchanges(dispatcher, cfg: ModelConfig, exchanges: int, workers: list) -> dict:
    """Median wall time and CPU per exchange of this process and of the `workers` processes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.hidden_size, generator=g)  # [1, H]
    # one row, top-k spread over both workers (as nearly every token at one stream)
    ids = torch.tensor([[0, cfg.num_experts - 1, 1, cfg.num_experts - 2]])[:, : cfg.top_k]
    weights = torch.full(ids.shape, 1.0 / cfg.top_k)  # [1, k]
    layer = cfg.moe_layers[0]
    for _ in range(200):  # warm-up: connections, threads, allocator
        dispatcher(layer, x, ids, weights)
    w0 = [cpu_s(w) for w in workers]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(exchanges):
        t = time.perf_counter()
        dispatcher(layer, x, ids, weights)
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    w1 = [cpu_s(w) for w in workers]
    dispatcher.close()
    gateway = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return {
        "wall_us": 1e6 * statistics.median(times),
        "gateway_cpu_us": 1e6 * gateway / exchanges,
        "worker_cpu_us": [1e6 * (b - a) / exchanges for a, b in zip(w0, w1)],
    }


def measure(transport: str, ckpt: Path, exchanges: int) -> dict:
    if transport == "local":
        return measure_local(ckpt, exchanges)
    cfg = ModelConfig.from_dir(ckpt)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--serve", transport, str(ckpt), str(w)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for w in range(WORKERS)
    ]
    try:
        addresses = [f"127.0.0.1:{p.stdout.readline().strip()}" for p in procs]
        placement = ExpertPlacement.contiguous(cfg.num_experts, WORKERS)
        kind = GrpcDispatcher if transport == "grpc" else TcpDispatcher
        dispatcher = kind(placement, addresses)
        workers = [psutil.Process(p.pid) for p in procs]
        return run_exchanges(dispatcher, cfg, exchanges, workers)
    finally:
        for p in procs:
            p.stdin.close()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exchanges", type=int, default=2000)
    ap.add_argument(
        "--transports",
        nargs="+",
        default=["local", "tcp", "grpc"],
        choices=["local", "tcp", "grpc"],
    )
    ap.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve[0], Path(a.serve[1]), int(a.serve[2]))
        return
    torch.set_num_threads(1)
    print(f"cpus={os.cpu_count()} exchanges={a.exchanges} workers={WORKERS} rows=1")
    print("| transport | exchange wall us (p50) | gateway CPU us | worker CPU us | all CPU us |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        make_tiny(ckpt, **TINY)
        for transport in a.transports:
            r = measure(transport, ckpt, a.exchanges)
            total = r["gateway_cpu_us"] + sum(r["worker_cpu_us"])
            per = " / ".join(f"{c:.0f}" for c in r["worker_cpu_us"]) or "(in the gateway)"
            print(f"| {transport} | {r['wall_us']:.0f} | {r['gateway_cpu_us']:.0f} | {per} "
                  f"| {total:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

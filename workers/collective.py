"""The collective transport, worker side, and the wire protocol both sides share.

One group per membership: the gateway is rank 0, expert shard w is rank w + 1. Per MoE layer the
gateway starts three all-to-alls in this order, and every worker takes part in all three (with
zero rows when none of its experts were chosen), so the loops stay in lockstep:

1. header: `HEADER` int64 per worker: command, layer, rows n, hidden H, top-k k, dtype code
2. rows: one uint8 message per worker: meta fp32 [n, 2k] (expert ids, then weights; the ids are
   exact in fp32), then x [n, H] in the model dtype
3. results: the worker's pre-summed rows [n, H] in the model dtype, back to the gateway

Workers only exchange with rank 0 (their splits towards other workers are 0).

The groups are our own (a fresh `TCPStore` and `ProcessGroupGloo` / `ProcessGroupNCCL` per
membership), not torch's default group, because of what gloo does on failure (measured with
torch 2.13, CPU): an op blocked on a peer fails within milliseconds once the peer's sockets
close, which happens when the peer process dies or drops the last reference to its group (Work
objects hold one); `destroy_process_group()` or `abort()` with a reference left closes nothing,
and the blocked op waits for its timeout. A group's destructor waits for the group's pending
ops, so a broken group is dropped on a daemon thread, which never holds up the caller (it does
not hold the GIL while it waits). The rank-0 store listens only on the given address (torch's
`tcp://` rendezvous listens on every interface), and on a loopback address gloo is bound to it
directly, which is what GLOO_SOCKET_IFNAME=lo would do, without changing the environment.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist
from expertmesh.ernie.devices import dtype_of_code

from .combine import Combiner
from .experts import ExpertShard

log = logging.getLogger(__name__)

HEADER = 6  # int64 per worker: command, layer, rows, hidden, k, dtype code
IDLE_TIMEOUT_S = 7 * 24 * 3600.0  # a worker waits this long for the next header


class Command(IntEnum):
    LAYER = 1
    SHUTDOWN = 2


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def pick_backend(device: str | torch.device, gpu_ids: Sequence[str] | None = None) -> str:
    """Returns "nccl" when this rank computes on a GPU of its own, else "gloo"; logs why.

    gpu_ids: the physical GPU of every rank (e.g. UUIDs), when the caller knows them; NCCL
    cannot put two ranks on one GPU.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        reason = f"{dev} is not a GPU"
    elif not torch.cuda.is_available():
        reason = "no CUDA device is visible"
    elif not dist.is_nccl_available():
        reason = "this torch build has no NCCL"
    elif gpu_ids is not None and len(set(gpu_ids)) < len(gpu_ids):
        reason = "ranks share a GPU and NCCL needs one GPU per rank"
    else:
        log.info("collective backend nccl: every rank has a GPU of its own")
        return "nccl"
    log.info("collective backend gloo: %s", reason)
    return "gloo"


def _timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _store(addr: str, port: int, rank: int, size: int, timeout_s: float) -> dist.TCPStore:
    if rank != 0:  # clients retry connecting until the timeout
        return dist.TCPStore(addr, port, size, False, _timeout(timeout_s))
    sock = socket.create_server((addr, port), backlog=max(128, size))  # this address only
    return dist.TCPStore(
        addr,
        port,
        size,
        True,
        _timeout(timeout_s),
        wait_for_workers=False,
        master_listen_fd=sock.detach(),  # the store owns (and closes) the socket
    )


def _gloo(store, addr: str, rank: int, size: int, timeout_s: float):
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _timeout(timeout_s)
    if is_loopback(addr):  # every rank is on this machine: keep gloo's sockets on loopback
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=addr)]
    else:  # GLOO_SOCKET_IFNAME, or the address of this host's name
        opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, opts)


def _nccl(store, rank: int, size: int, timeout_s: float):
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = _timeout(timeout_s)
    return dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, size, opts)


def _drop(refs: list) -> None:
    refs.clear()  # the last references: gloo's destructor may wait for pending ops here


@dataclass
class Group:
    """One membership of the gateway and its workers."""

    rank: int
    size: int
    device: torch.device  # where rows travel: cpu (gloo) or this rank's GPU (nccl)
    control: Any  # ProcessGroupGloo: headers (and rows, with gloo)
    data: Any  # the same gloo group, or a ProcessGroupNCCL
    refs: list = field(default_factory=list)  # the store; works of failed exchanges

    def all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        timeout_s: float,
        control: bool = False,
    ) -> dist.Work:
        """Start an all-to-all over dim 0 with the given split sizes; returns at once."""
        opts = dist.AllToAllOptions()
        opts.timeout = _timeout(timeout_s)
        pg = self.control if control else self.data
        return pg.alltoall_base(out, inp, out_splits, in_splits, opts)

    def retire(self, works: list) -> None:
        """Keep works that may never finish until the group is released."""
        self.refs.extend(works)
        works.clear()

    def release(self, wait_s: float = 2.0) -> None:
        """Drop the group; its peers' ops fail once its sockets close.

        Dropping waits for the group's pending ops (up to their timeout), so it happens on a
        daemon thread, awaited for at most `wait_s`: a group that is done goes at once.
        """
        refs = [self.control, self.data, *self.refs]
        self.control = self.data = None
        self.refs = []
        t = threading.Thread(target=_drop, args=(refs,), daemon=True, name="group-release")
        t.start()
        t.join(wait_s)


def open_group(
    master_addr: str, master_port: int, rank: int, world_size: int, backend: str, timeout_s: float
) -> Group:
    """Join (rank 0: host) a fresh group; blocks until all `world_size` ranks are in."""
    store = _store(master_addr, master_port, rank, world_size, timeout_s)
    control = _gloo(store, master_addr, rank, world_size, timeout_s)
    if backend == "gloo":
        return Group(rank, world_size, torch.device("cpu"), control, control, [store])
    if backend != "nccl":
        raise ValueError(f"unknown collective backend {backend!r}")
    device = torch.device("cuda", torch.cuda.current_device())
    data = _nccl(store, rank, world_size, timeout_s)
    return Group(rank, world_size, device, control, data, [store])


def done_event(works: Sequence[dist.Work]) -> threading.Event:
    """An event set when every work has finished, or as soon as one has failed."""
    event = threading.Event()
    futures = [w.get_future() for w in works]

    def check(fut) -> None:
        try:
            fut.value()
        except Exception:
            event.set()  # failed: no point in waiting for the rest
            return
        if all(f.done() for f in futures):
            event.set()

    for f in futures:
        f.add_done_callback(check)
    return event


def pack_rows(
    x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """One worker's rows as bytes: meta fp32 [n, 2k] (ids, weights), then x [n, H]."""
    meta = torch.cat([expert_ids.float(), weights.float()], dim=-1)  # [n, 2k]
    parts = [meta.reshape(-1).view(torch.uint8), x.contiguous().reshape(-1).view(torch.uint8)]
    return torch.cat([p.to(device) for p in parts])  # [n * (8k + H * itemsize)]


def unpack_rows(buf: torch.Tensor, n: int, hidden: int, k: int, dtype: torch.dtype):
    """Inverse of `pack_rows`: x [n, H], expert_ids [n, k] (long), weights [n, k] (fp32)."""
    split = n * 2 * k * 4  # a multiple of 4: x's bytes stay aligned for its dtype
    meta = buf[:split].view(torch.float32).view(n, 2 * k)  # [n, 2k]
    x = buf[split:].view(dtype).view(n, hidden)  # [n, H]
    return x, meta[:, :k].long(), meta[:, k:]


def row_bytes(hidden: int, k: int, dtype: torch.dtype) -> int:
    return 2 * k * 4 + hidden * dtype.itemsize


class _Ended(Exception):
    """serve() has to return: the group broke, or stop() was called. args[0] says which."""


class CollectiveWorker:
    """Serves one ExpertShard over a collective group; rejoins a new group after a failure.

    `serve()` blocks, so run it on a thread of its own (a Ray actor's background thread is
    fine: no signal handlers). `stop()` from another thread makes it return promptly.
    """

    def __init__(self, shard: ExpertShard, combiner: Combiner | None = None):
        self.shard = shard
        self.combiner = combiner or Combiner(shard)  # other gateways' groups: computed together
        self.timeout_s = 30.0  # for rows and results once a header has arrived
        self.group: Group | None = None
        self._stop = threading.Event()
        self._waiting: threading.Event | None = None
        self._compute_device = shard.device

    def join(
        self,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 30.0,
    ) -> None:
        """Leave any group held, then join the gateway's new one (blocks until all are in)."""
        self.leave()
        self._stop.clear()
        self.timeout_s = timeout_s
        self.group = open_group(master_addr, master_port, rank, world_size, backend, timeout_s)
        log.info("expert worker: rank %d/%d at %s:%d", rank, world_size, master_addr, master_port)

    def leave(self) -> None:
        if self.group is not None:
            self.group.release()
            self.group = None

    def stop(self) -> None:
        """Make a running `serve()` return "stopped" (thread-safe)."""
        self._stop.set()
        waiting = self._waiting
        if waiting is not None:
            waiting.set()

    def serve(self) -> str | None:
        """Answer layers until SHUTDOWN (returns None) or the group breaks (returns why).

        Leaves the group before returning, so the caller can `join` a new one. Errors of the
        expert computation itself are raised.
        """
        if self.group is None:
            raise RuntimeError("serve() before join()")
        try:
            while True:
                command, *layer = self._recv_header()
                if command == Command.SHUTDOWN:
                    log.info("expert worker: shutdown")
                    return None
                self._answer(*layer)
        except _Ended as e:
            log.warning("expert worker: %s", e.args[0])
            return e.args[0]
        finally:
            self.leave()

    # -- one layer ----------------------------------------------------------------------------

    def _exchange(self, out, inp, out_splits, in_splits, timeout_s, control=False) -> None:
        """One all-to-all with the gateway, waited for without spinning."""
        try:
            work = self.group.all_to_all(out, inp, out_splits, in_splits, timeout_s, control)
        except RuntimeError as e:
            raise _Ended(f"group broke: {e}") from e
        done = done_event([work])
        self._waiting = done
        try:
            finished = not self._stop.is_set() and done.wait(timeout_s)
        finally:
            self._waiting = None
        if self._stop.is_set() or not finished:
            self.group.retire([work])  # may never finish: released with the group
            raise _Ended("stopped" if self._stop.is_set() else f"no message in {timeout_s:.0f}s")
        try:
            work.wait()  # raises the op's error, if any
        except RuntimeError as e:
            raise _Ended(f"group broke: {e}") from e

    def _recv_header(self) -> list[int]:
        size = self.group.size
        header = torch.empty(HEADER, dtype=torch.int64)
        nothing = torch.empty(0, dtype=torch.int64)
        splits = [HEADER] + [0] * (size - 1)
        self._exchange(header, nothing, splits, [0] * size, IDLE_TIMEOUT_S, control=True)
        return header.tolist()

    def _answer(self, layer: int, n: int, hidden: int, k: int, dtype_code: int) -> None:
        """Receive n rows, compute, send n pre-summed rows back (n may be 0)."""
        dev, dtype = self.group.device, dtype_of_code(dtype_code)
        zeros = [0] * self.group.size
        buf = torch.empty(n * row_bytes(hidden, k, dtype), dtype=torch.uint8, device=dev)
        nothing = torch.empty(0, dtype=torch.uint8, device=dev)
        self._exchange(buf, nothing, [buf.numel()] + zeros[1:], zeros, self.timeout_s)
        x, ids, weights = unpack_rows(buf, n, hidden, k, dtype)  # [n, H], [n, k], [n, k]
        y = self._forward(layer, x, ids, weights).to(dev, dtype)  # [n, H]
        out = torch.empty(0, hidden, dtype=dtype, device=dev)
        self._exchange(out, y, zeros, [n] + zeros[1:], self.timeout_s)

    def _forward(self, layer, x, ids, weights) -> torch.Tensor:
        if not len(x):
            return x
        dev = self._compute_device
        with torch.inference_mode():
            return self.combiner.forward(layer, x.to(dev), ids.to(dev), weights.to(dev))

"""Running `expertmesh serve` as a subprocess for tests, and making sure it leaves nothing behind."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from expertmesh.cluster.runtime.resources import free_port


def descendants(pid: int) -> set[int]:
    """PIDs of all processes below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pids: set[int]) -> set[int]:
    left = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(p)
    return left


RAY_WORKER_PORTS_END = 19999  # Ray's workers listen on 10002-19999 by default


def listen_port() -> int:
    """A free port below the kernel's ephemeral range and above Ray's worker ports: a port that
    `free_port` picks from the ephemeral range can be taken, between the choice and the HTTP
    proxy's bind, by any of the new server's outgoing connections or port-0 listeners (it
    happened once: "Failed to bind to address")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low <= RAY_WORKER_PORTS_END + 1000:
        return free_port()
    for _ in range(100):
        port = random.randrange(RAY_WORKER_PORTS_END + 1, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


class Server:
    def __init__(self, *args: str, log_path: Path, timeout_s: float = 300):
        self.port = listen_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "expertmesh.cluster.cli",
                "serve",
                "--port",
                str(self.port),
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self._wait_ready(log_path, timeout_s)

    def _wait_ready(self, log_path: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
            if "serving" in log_path.read_text():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not ready:\n{log_path.read_text()[-3000:]}")

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=120, **kw)

    def stop(self, timeout_s: float = 90) -> set[int]:
        """SIGTERM, then the PIDs of its processes still alive (should be none)."""
        family = descendants(self.proc.pid) | {self.proc.pid}
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 20
        while alive(family) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = alive(family)
        for p in left:  # never leave them behind, even when the test fails
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        self.log.close()
        return left

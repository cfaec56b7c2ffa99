"""A local `expertmesh serve` for the benchmarks that start their own server (bench serve, soak).

It runs in a session of its own on 127.0.0.1 and a free port, its log kept in a temporary file;
`stop_server` sends SIGTERM and ends whatever of its process tree is left after a grace period.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import psutil


def start_server(
    workers: int,
    transport: str,
    model: str | None,
    prefix: str,
    timeout_s: float = 600,
    extra: list[str] = (),
) -> tuple[subprocess.Popen, str, str]:
    """(process, base URL, log path) once the server says it is serving; extra: more flags."""
    from ..runtime.resources import free_port  # imports Ray: not when the CLI starts

    port = free_port()
    cmd = [sys.executable, "-m", "expertmesh.cluster.cli", "serve", "--port", str(port)]
    cmd += ["--workers", str(workers), "--transport", transport]
    cmd += ["--model", model] if model else []
    cmd += list(extra)
    with tempfile.NamedTemporaryFile("w", prefix=prefix, suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if "serving" in Path(log.name).read_text(errors="replace"):
            return proc, f"http://127.0.0.1:{port}", log.name
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"the server did not start; its log:\n{Path(log.name).read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, grace_s: float = 120) -> list[int]:
    """SIGTERM, up to `grace_s` for its process tree to end, then SIGKILL to what is left; the
    PIDs that had to be killed."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:  # already gone
        family = []
    proc.terminate()
    _, left = psutil.wait_procs(family, timeout=grace_s)
    for p in left:  # never leave them behind
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return [p.pid for p in left]


def end_children(grace_s: float, earlier: Iterable[psutil.Process] = ()) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, every process below this one still alive, and
    those of `earlier` (taken before a shutdown) still running.

    Why `earlier`: a process whose parent exits is re-parented out of this tree. Ray's raylet
    starts its agents (dashboard, runtime env) as its own children, so once ray.shutdown() has
    ended the raylet they are no longer below this process, yet under load they can linger for
    tens of seconds. `is_running()` also tells a reused PID from the process it was."""
    procs = {p.pid: p for p in earlier}
    procs.update((p.pid, p) for p in psutil.Process().children(recursive=True))
    children = []
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                children.append(p)
    for c in children:
        with contextlib.suppress(psutil.Error):
            c.terminate()
    _, left = psutil.wait_procs(children, timeout=grace_s)
    for c in left:
        with contextlib.suppress(psutil.Error):
            c.kill()

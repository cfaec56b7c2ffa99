"""`expertmesh cluster`: a Ray cluster of several nodes on this machine, all on 127.0.0.1.

The nodes are started from this process with `ray.cluster_utils.Cluster` (a head, then
nodes-1 more raylets that join it): with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 set before Ray is
imported, every one of them takes 127.0.0.1 as its address. (`ray start` nodes would bind the
machine's own address whatever --node-ip-address says, and `ray start --address` refuses to
join with that variable set.) Every node, and COMMAND, get the same RAY_AUTH_MODE.

COMMAND runs with RAY_ADDRESS set to the head, then every node is stopped and the exit status is
COMMAND's. Without COMMAND the nodes run until Ctrl-C or SIGTERM, and the line to `export` in
another shell is printed. With --netns the nodes and COMMAND run in a network namespace of
their own, where 127.0.0.1 is the only address: nothing outside it can reach them (Ray Serve's
replicas listen on all addresses, `[::]`, whatever Ray's own settings; there that is loopback
only), and their ports cannot clash with anything outside.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Literal

import psutil
from pydantic import BaseModel, Field

from .local_server import end_children

log = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": every Ray process takes 127.0.0.1
IN_NETNS_ENV = "EXPERTMESH_CLUSTER_NETNS"  # set inside the namespace that --netns makes


class LocalClusterArgs(BaseModel):
    nodes: int = Field(2, ge=1, description="Ray nodes: the head and nodes-1 more")
    cpus_per_node: int = Field(
        4, ge=1, description="logical CPUs each node offers (all share this machine's cores)"
    )
    object_store_mb: int = Field(256, ge=80, description="object store of each node in MiB")
    dashboard: bool = Field(
        False,
        description="also run Ray's dashboard on 127.0.0.1 (port 8265 or the next free one), "
        "which `serve deploy`, `serve status` and Ray's state API need",
    )
    auth_mode: Literal["token", "disabled"] | None = Field(
        None,
        description="RAY_AUTH_MODE of every node and of COMMAND; default: $RAY_AUTH_MODE if "
        "set, else token (what a new Ray takes)",
    )
    netns: bool = Field(
        False,
        description="run the nodes and COMMAND in a network namespace of their own with only "
        "127.0.0.1 (needs unshare and ip; root, or unprivileged user namespaces)",
    )
    command: list[str] = Field(
        description="what to run on the cluster, after `--` (RAY_ADDRESS is set for it); "
        "none: keep the nodes up until Ctrl-C or SIGTERM",
        json_schema_extra={"positional": True, "nargs": "*", "metavar": "COMMAND"},
    )


def auth_mode(a: LocalClusterArgs) -> str:
    return a.auth_mode or os.environ.get("RAY_AUTH_MODE") or "token"


def run_cluster(a: LocalClusterArgs) -> int:
    """Start the nodes, run COMMAND (or wait for a signal), stop the nodes; COMMAND's status."""
    if a.netns and not os.environ.get(IN_NETNS_ENV):
        reexec_in_netns(a)  # does not return
    os.environ[LOOPBACK_ENV] = "0"  # before Ray is imported (the CLI imports none before this)
    os.environ["RAY_AUTH_MODE"] = auth_mode(a)
    env = os.environ.copy()
    cluster = start_nodes(a)
    stopping = threading.Event()
    try:
        env["RAY_ADDRESS"] = cluster.address
        if a.dashboard:  # where `serve deploy` and `serve status` look for it
            env["RAY_DASHBOARD_ADDRESS"] = f"http://{cluster.webui_url}"
        announce(a, cluster, env)
        if a.command:
            return run_command(a.command, env, stopping)
        wait_for_signal(stopping)
        return 0
    finally:
        stopping.set()
        stop_nodes(cluster)


def start_nodes(a: LocalClusterArgs):
    """The head and nodes-1 more, all registered, on 127.0.0.1."""
    from ray._private import ray_constants
    from ray._private.authentication.authentication_token_setup import (
        ensure_token_if_auth_enabled,
    )
    from ray.cluster_utils import Cluster

    if ray_constants.ENABLE_RAY_CLUSTER:  # Ray was imported before LOOPBACK_ENV was set
        raise RuntimeError(
            f"Ray was imported before {LOOPBACK_ENV}=0 was set: its nodes would take this "
            "machine's network address; set it in the environment"
        )
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)  # as ray.init does
    node = {
        "num_cpus": a.cpus_per_node,
        "num_gpus": 0,  # each node would claim every GPU of the machine
        "object_store_memory": a.object_store_mb * 2**20,
        "node_ip_address": "127.0.0.1",
    }
    t0 = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "include_dashboard": a.dashboard, "dashboard_host": "127.0.0.1"},
    )
    try:
        for _ in range(a.nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes(timeout=120)
    except BaseException:
        stop_nodes(cluster)
        raise
    log.info("%d Ray nodes up in %.1f s", a.nodes, time.monotonic() - t0)
    return cluster


def announce(a: LocalClusterArgs, cluster, env: dict) -> None:
    address = cluster.address
    where = " in a network namespace of its own" if a.netns else ""
    exports = f"RAY_ADDRESS={address} {LOOPBACK_ENV}=0 RAY_AUTH_MODE={env['RAY_AUTH_MODE']}"
    if a.dashboard:  # 8265, or the next free port
        exports += f" RAY_DASHBOARD_ADDRESS={env['RAY_DASHBOARD_ADDRESS']}"
    lines = [
        f"expertmesh: a Ray cluster of {a.nodes} nodes ({a.cpus_per_node} CPUs each) on "
        f"127.0.0.1{where}, head at {address}",
        f"  export {exports}",
    ]
    if a.netns:
        lines.append(f"  (another shell gets into the namespace with: nsenter -t {os.getpid()} -n)")
    lines.append(f"  running: {shlex.join(a.command)}" if a.command else "  (Ctrl-C stops it)")
    print("\n".join(lines), flush=True)


def run_command(command: list[str], env: dict, stopping: threading.Event) -> int:
    """COMMAND's exit status (128+N when a signal N ended it). It stays in this process group,
    so it keeps the terminal; SIGTERM is passed on to it, and so is SIGINT unless the terminal
    sent it (then COMMAND got it already)."""
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as e:
        raise ValueError(f"cannot run {command[0]!r}: {e.strerror}") from None

    def forward(sig, _frame):
        if stopping.is_set() or proc.poll() is not None:
            return
        if sig == signal.SIGINT and _terminal_in_front():
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


def _terminal_in_front() -> bool:
    """Whether this process group is the foreground of a terminal (Ctrl-C reaches all of it)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def wait_for_signal(stopping: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    while not stopping.wait(1.0):
        pass
    log.info("stopping the nodes")


def stop_nodes(cluster, timeout_s: float = 60) -> None:
    """Every node's processes, the workers below them included: gracefully (Ray's own
    shutdown, at most `timeout_s`), then SIGKILL to whatever is left below this process."""
    below = psutil.Process().children(recursive=True)  # the nodes' processes, agents included
    t = threading.Thread(target=cluster.shutdown, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        log.warning("the Ray nodes did not stop within %.0f s; killing them", timeout_s)
    end_children(5.0, below)


def reexec_in_netns(a: LocalClusterArgs) -> None:
    """Run this command again (same PID: unshare and sh exec) inside a new network namespace
    whose loopback is up; root, or an unprivileged user namespace (`unshare -r`)."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        raise ValueError("--netns needs `unshare` (util-linux) and `ip` (iproute2)")
    flags = ["--net"] if os.geteuid() == 0 else ["--map-root-user", "--net"]
    script = f'{ip} link set lo up && exec "$@"'
    argv = [unshare, *flags, "--", "sh", "-c", script, "sh", *cli_argv(a)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(unshare, argv, {**os.environ, IN_NETNS_ENV: "1"})


def cli_argv(a: LocalClusterArgs) -> list[str]:
    """`python -m expertmesh.cluster.cli cluster` with the same settings."""
    argv = [sys.executable, "-m", "expertmesh.cluster.cli", "cluster"]
    argv += ["--nodes", str(a.nodes), "--cpus-per-node", str(a.cpus_per_node)]
    argv += ["--object-store-mb", str(a.object_store_mb), "--auth-mode", auth_mode(a)]
    argv += ["--dashboard"] * a.dashboard + ["--netns"]
    return argv + (["--", *a.command] if a.command else [])

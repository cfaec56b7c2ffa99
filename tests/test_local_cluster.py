"""`expertmesh cluster`: several Ray nodes on one machine, all on 127.0.0.1, and `serve` and
`bench serve` across them (slow); its flags, and a CLI that imports no Ray before it has pinned
Ray to loopback (fast)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from expertmesh.cluster.cli import local_cluster
from expertmesh.cluster.cli.args import parse
from expertmesh.cluster.cli.local_cluster import LocalClusterArgs
from expertmesh.cluster.cli.main import build_parser, on_loopback
from serving import alive, descendants, listen_port

CLI = [sys.executable, "-m", "expertmesh.cluster.cli"]


def parsed(argv: list[str]) -> LocalClusterArgs:
    ns = build_parser().parse_args(argv)
    return parse(ns.parser, ns.args_model, ns)


def test_cluster_flags_and_command():
    a = parsed(["cluster", "--nodes", "3", "--", "expertmesh", "serve", "--workers", "2"])
    assert (a.nodes, a.cpus_per_node, a.netns) == (3, 4, False)
    assert a.command == ["expertmesh", "serve", "--workers", "2"]
    assert parsed(["cluster"]).command == []  # no COMMAND: the nodes stay up until a signal
    again = parsed(["cluster", "--nodes", "2", "--dashboard", "--", "sh", "-c", "echo --x"])
    again = again.model_copy(update={"netns": True})
    # --netns runs the same command again inside the namespace: the same settings
    inside = parsed(local_cluster.cli_argv(again)[3:])
    assert inside == again.model_copy(update={"auth_mode": local_cluster.auth_mode(again)})


def test_the_cli_imports_no_ray():
    """The CLI pins Ray to 127.0.0.1 before it imports Ray (Ray reads the setting once, at
    import): importing the CLI must not import Ray already."""
    code = "import sys, expertmesh.cluster.cli.main; print('ray' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_on_loopback(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for address in (None, "local", "127.0.0.1:6379", "localhost:6379", "ray://127.0.0.1:10001"):
        assert on_loopback(address), address
    for address in ("10.0.0.5:6379", "ray-head:6379", "auto"):
        assert not on_loopback(address), address
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:41000")  # "auto" is $RAY_ADDRESS, if set
    assert on_loopback("auto")


# ---- two nodes, serve and bench serve across them --------------------------------------------


def is_loopback(ip: str) -> bool:
    ip = ip.removeprefix("::ffff:")
    return ipaddress.ip_address(ip).is_loopback


def off_loopback(pids: set[int]) -> list[str]:
    """TCP sockets of `pids` with an address that is not loopback. Ray Serve's replicas listen
    on all addresses for their inter-deployment gRPC (`[::]:0`, hard-coded in Ray 2.60, with no
    setting) and are left out; `expertmesh cluster --netns` keeps even those inside."""
    found = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            cmd, conns = " ".join(p.cmdline()), p.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            ips = [c.laddr.ip] + ([c.raddr.ip] if c.raddr else [])
            if all(is_loopback(ip) for ip in ips):
                continue
            serve_grpc = c.status == psutil.CONN_LISTEN and c.laddr.ip in ("::", "0.0.0.0")
            if serve_grpc and cmd.startswith("ray::ServeReplica"):
                continue
            found.append(f"{cmd[:60]} (pid {pid}): {c.status} {c.laddr} {c.raddr}")
    return found


def wait_for(log, pattern: str, proc: subprocess.Popen, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if m := re.search(pattern, text):
            return m
        assert proc.poll() is None, f"exited ({proc.returncode}):\n{text[-4000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} within {timeout_s} s:\n{text[-4000:]}")


def engine_texts(prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Greedy answers of the in-process engine (experts in this process) on the built-in model."""
    from expertmesh.cluster.config import builtin_model_dir
    from expertmesh.ernie.tokenizer import load_tokenizer
    from expertmesh.router.engine import LLMEngine
    from expertmesh.router.sampling import SamplingParams

    path = builtin_model_dir()
    outs = LLMEngine.from_checkpoint(path).generate(
        prompts, SamplingParams(max_tokens=max_tokens, temperature=0)
    )
    tok = load_tokenizer(path)
    return [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]


def stop(proc: subprocess.Popen, family: set[int], timeout_s: float = 90) -> set[int]:
    """SIGTERM to the cluster command, then the PIDs still alive (killed, so none is left)."""
    family = family | descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive(family)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_and_bench_across_two_nodes(tmp_path):
    port = listen_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the same in every process that joins
    serve = [*CLI, "serve", "--address", "auto", "--strategy", "SPREAD", "--transport", "grpc"]
    serve += ["--workers", "2", "--port", str(port)]
    log = tmp_path / "cluster.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*CLI, "cluster", "--nodes", "2", "--", *serve],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    family: set[int] = set()
    try:
        address = wait_for(log, r"head at (127\.0\.0\.1:\d+)", proc, 120)[1]
        wait_for(log, r"expertmesh: serving", proc, 180)
        up_s = time.monotonic() - t0
        family = descendants(proc.pid)

        health = httpx.get(url + "/health", timeout=10).json()
        assert health["ready"] and health["strategy"] == "SPREAD", health
        worker_nodes = {w["node_id"] for w in health["expert_workers"]}
        assert len(worker_nodes) == 2, health  # one expert worker on each node
        assert off_loopback(family) == []

        result = tmp_path / "bench.json"
        bench = [*CLI, "bench", "serve", "--url", url, "--ray-address", address]
        bench += ["--clients-per-node", "1", "--concurrency", "2", "--requests", "2"]
        bench += ["--max-tokens", "8", "--prompt-tokens", "16", "--out", str(result)]
        ran = subprocess.run(bench, env=env, capture_output=True, text=True, timeout=180)
        assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-4000:]
        doc = json.loads(result.read_text())
        assert doc["ray"] == {"nodes": 2, "clients_per_node": 1}
        for level in doc["levels"]:
            s = level["summary"]
            assert s["errors"] == {} and s["ok"] == s["requests"] == 4, s
            assert s["output_tokens"] == 4 * 8
        # a load generator on each node: the same two nodes the expert workers are on
        assert {g["node_id"] for g in doc["levels"][0]["generators"]} == worker_nodes

        # greedy answers through the cluster equal the in-process engine's
        prompts = [[5, 17, 99, 3], [40, 41], [7] * 9]
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "prompt": prompts, "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        assert got == engine_texts(prompts, 8)
    finally:
        left = stop(proc, family)
    print(f"up and serving in {up_s:.1f} s, all of it {time.monotonic() - t0:.1f} s")
    assert left == set(), f"processes left behind: {left}"
    assert proc.returncode == 0, log.read_text()[-3000:]


INSIDE = """
import json, subprocess, ray
ray.init()
links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
print("NODES", json.dumps([n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]))
print("LINKS", json.dumps([line.split()[1].rstrip(":") for line in links]))
"""


def can_unshare_net() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    flags = ["--net"] if os.geteuid() == 0 else ["--map-root-user", "--net"]
    return subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_netns_keeps_the_nodes_and_command_inside(tmp_path):
    """--netns: the same command again in a namespace of its own, where lo is all there is."""
    if not can_unshare_net():
        pytest.skip("no network namespaces here (unshare --net is refused)")
    argv = [*CLI, "cluster", "--nodes", "2", "--cpus-per-node", "1", "--netns"]
    log = tmp_path / "netns.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*argv, "--", sys.executable, "-c", INSIDE],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    family: set[int] = set()
    try:
        wait_for(log, r"running: ", proc, 120)
        family = descendants(proc.pid)
        proc.wait(120)
    finally:
        left = stop(proc, family)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "in a network namespace of its own" in out
    assert json.loads(re.search(r"^NODES (.*)$", out, re.M)[1]) == ["127.0.0.1"] * 2
    assert json.loads(re.search(r"^LINKS (.*)$", out, re.M)[1]) == ["lo"], out[-3000:]
    assert left == set()


def test_end_children_also_ends_processes_reparented_out_of_the_tree():
    """What a server's stop does with Ray's agents once the raylet, their parent, has exited:
    a grandchild whose parent died is no longer below us, and must still be ended when it was
    in the snapshot taken before the shutdown."""
    from expertmesh.cluster.cli.local_server import end_children

    # a child that starts a long sleeper, prints its PID, and then waits on stdin
    script = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print(p.pid, flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    grandchild = int(child.stdout.readline())
    try:
        before = psutil.Process().children(recursive=True)
        assert grandchild in {p.pid for p in before}
        child.kill()  # the grandchild is re-parented out of this process's tree
        child.wait(10)
        assert grandchild not in {p.pid for p in psutil.Process().children(recursive=True)}
        end_children(2.0, before)
        deadline = time.monotonic() + 10
        while alive({grandchild}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive({grandchild}) == set()
    finally:
        if alive({grandchild}):
            os.kill(grandchild, signal.SIGKILL)

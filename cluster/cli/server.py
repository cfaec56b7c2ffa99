"""`expertmesh serve`: Ray, the cluster and the Serve application, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import httpx
import psutil
import ray
from ray import serve

from ..api.app import build_app, gateway_count
from ..api.routing import known_replicas
from ..config import ServeArgs
from ..runtime.launch import start_ray
from .local_server import end_children
from .pinning import Pinner, make_plan

log = logging.getLogger(__name__)
APP = "expertmesh"


def wait_healthy(url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f}s")


def pinning_plan(a: ServeArgs) -> tuple[ServeArgs, Pinner | None]:
    """With --pin-cpus: the plan, and the args with torch threads set to its blocks' size
    (unless given)."""
    if not a.pin_cpus:
        return a, None
    if a.address:
        log.warning("--pin-cpus pins only the processes of a Ray this command starts: ignored")
        return a, None
    compute = gateway_count(a) + (0 if a.cluster_config().in_process else a.workers)
    plan = make_plan(sorted(os.sched_getaffinity(0)), compute)
    if plan is None:
        log.warning("--pin-cpus: %d cores cannot give %d engines a core each and keep one for "
                    "the rest; not pinning", len(os.sched_getaffinity(0)), compute)  # fmt: skip
        return a, None
    given = a.model_fields_set
    threads = {k: plan.threads for k in ("gateway_threads", "torch_threads") if k not in given}
    log.info("--pin-cpus: engines on %s, the rest on %s", plan.blocks, plan.rest)
    return a.model_copy(update=threads), Pinner(plan)


def run_server(a: ServeArgs) -> int:
    started_ray = not ray.is_initialized()
    a, pinner = pinning_plan(a)
    start_ray(a.address)
    stop = threading.Event()

    def on_signal(*_):
        if not serving.is_set():  # still deploying: stop waiting for it
            raise KeyboardInterrupt
        stop.set()

    serving = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        if pinner is not None:
            pinner.start()  # before the replicas start: pins them as they come
        serve.run(build_app(a), name=APP, route_prefix="/")
        host = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
        url = f"http://{host}:{a.port}"
        wait_healthy(url)
        serving.set()
        print(
            f"expertmesh: serving {a.resolve_model()[1]!r} at {url}/v1 (Ctrl-C stops)", flush=True
        )
        stop.wait()
        log.info("shutting down")
    except KeyboardInterrupt:
        log.info("interrupted; shutting down")
    finally:
        _shutdown(started_ray)
    return 0


def _drain(timeout_s: float = 2.0) -> None:
    """End in-flight requests with an error event, so that each open stream says why it ends."""
    try:
        gateway = serve.get_deployment_handle("Gateway", app_name=APP)
        message = "the server is shutting down"
        gateway.drain.remote(message).result(timeout_s=timeout_s)  # one; and now we know all
        calls = [gateway.options(session_id=r).drain.remote(message) for r in known_replicas()]
        for call in calls:
            call.result(timeout_s=timeout_s)
        time.sleep(0.3)  # the error events reach the clients
    except Exception as e:  # not deployed yet, or already gone
        log.info("no gateway to drain: %s", e)


def _within(fn, timeout_s: float) -> bool:
    """Run `fn` on a daemon thread for at most `timeout_s`; whether it finished."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(max(0.1, timeout_s))
    return not t.is_alive()


def _shutdown(started_ray: bool, deadline_s: float = 9.0) -> None:
    """Drain, stop Serve, then Ray, within `deadline_s` whatever state Ray is in.

    A Ctrl-C in a terminal reaches Ray's own processes too (they share the terminal's process
    group), and serve.shutdown() or ray.shutdown() can then wait a minute on a dead GCS. Past
    the deadline, the processes this command started are ended by PID and it exits.
    """
    end = time.monotonic() + deadline_s
    below = psutil.Process().children(recursive=True)  # Ray's processes, agents included
    _within(_drain, 2.5)
    if not _within(serve.shutdown, end - time.monotonic() - 2.0):
        log.warning("Serve did not shut down in time; stopping Ray anyway")
    if not started_ray:
        return
    if _within(ray.shutdown, end - time.monotonic() - 0.5):
        end_children(0.0, below)
        return
    log.warning("Ray did not shut down in time; ending its processes")
    end_children(0.5, below)
    logging.shutdown()
    os._exit(0)  # a stuck ray.shutdown() would also hang the interpreter's exit

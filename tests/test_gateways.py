"""M gateways : N workers over HTTP: parity, failover (SIGKILL, SIGSTOP), autoscaling, health.

Every test runs `expertmesh serve --gateways ...` as a subprocess, with the gateway replicas
sharing one pool of two expert workers, and talks to it with the official `openai` client.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from conftest import CONFIGS, prompts_of, reference_model
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.tokenizer import load_tokenizer
from serving import Server, descendants

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint(**CONFIGS["top2of8-shared1"])


def serve(ckpt, tmp_path, *flags: str) -> Server:
    return Server("--model", str(ckpt), "--workers", "2", *flags, log_path=tmp_path / "serve.log")


def processes(s: Server, name: str) -> list[int]:
    """PIDs of the server's processes whose command line starts with `name` (Ray names its
    actor processes `ray::<Class>...`)."""
    out = []
    for p in descendants(s.proc.pid):
        try:
            if name in open(f"/proc/{p}/cmdline").read().split("\0")[0]:
                out.append(p)
        except OSError:
            pass
    return sorted(out)


def health(s: Server) -> dict:
    r = httpx.get(s.url + "/health", timeout=10)
    return {"status": r.status_code, **r.json()}


def wait_for(what, timeout_s: float = 120, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def ready_gateways(s: Server) -> list[dict]:
    return [g for g in health(s).get("gateways", []) if g.get("ready")]


def complete(client, ckpt, prompt: list[int], max_tokens: int = MAX_TOKENS) -> tuple[str, int]:
    r = client.completions.create(
        model=str(ckpt), prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={}
    )
    return r.choices[0].text, r.usage.completion_tokens


def reference(ckpt, prompt: list[int], n: int = MAX_TOKENS) -> str:
    tok = load_tokenizer(ckpt)
    with torch.no_grad():
        out = reference_model(ckpt).generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False
        )
    return tok.decode(out[0, len(prompt) :].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("transport", ["grpc", "tcp", "collective"])
def test_two_gateways_share_the_workers_and_keep_parity(ckpt, tmp_path, transport):
    """32 concurrent greedy requests over 2 gateways and 2 workers: each equals its solo run
    and transformers' tokens; the workers exist once, both gateways take requests."""
    prompts = prompts_of([3 + i % 7 for i in range(32)], ModelConfig.from_dir(ckpt).vocab_size)
    s = serve(ckpt, tmp_path, "--gateways", "2", "--transport", transport)
    try:
        wait_for(lambda: len(ready_gateways(s)) == 2)
        h = health(s)
        assert [w["up"] for w in h["expert_workers"]] == [True, True]
        assert len(processes(s, "ray::ExpertWorker")) == 2  # placed once, for both gateways
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        solo = [complete(client, ckpt, p) for p in prompts]
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(lambda p: complete(client, ckpt, p), prompts))
        assert together == solo
        assert all(n == MAX_TOKENS for _, n in solo)
        assert [text for text, _ in solo] == [reference(ckpt, p) for p in prompts]
        taken = [g["requests"] for g in health(s)["gateways"]]
        assert len(taken) == 2 and min(taken) > 0 and sum(taken) == 64, taken
        metrics = httpx.get(s.url + "/metrics", timeout=10).text
        assert re.search(r"^expertmesh_gateways 2\.0$", metrics, re.M), metrics
    finally:
        assert s.stop() == set()


def stream_texts(s: Server, ckpt, prompts, started: threading.Semaphore | None = None):
    """Stream each prompt at once (greedy, 48 tokens): its text and any SSE error events."""
    results: dict[int, tuple[str, list]] = {}

    def one(i: int) -> None:
        body = {
            "model": str(ckpt),
            "prompt": prompts[i],
            "max_tokens": 48,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        texts, errors = [], []
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = __import__("json").loads(line[6:])
                if "error" in chunk:
                    errors.append(chunk)
                    continue
                texts.append(chunk["choices"][0]["text"])
                if started is not None and len(texts) == 4:
                    started.release()
        results[i] = ("".join(texts), errors)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    return threads, results


def run_all(threads) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)


@pytest.mark.parametrize("transport", ["grpc"])
def test_a_gateway_killed_or_stopped_mid_stream_loses_no_request(ckpt, tmp_path, transport):
    """SIGKILL, then SIGSTOP, one of two gateways while 16 greedy streams run across both:
    16/16 finish, each equal to its run without the failure, with no SSE error event."""
    prompts = prompts_of([4 + i % 5 for i in range(16)], ModelConfig.from_dir(ckpt).vocab_size, 1)
    s = serve(
        ckpt, tmp_path, "--gateways", "2", "--transport", transport, "--gateway-timeout-s", "3"
    )
    try:
        wait_for(lambda: len(ready_gateways(s)) == 2)
        threads, want = stream_texts(s, ckpt, prompts)
        run_all(threads)
        assert all(not errors for _, errors in want.values())
        for sig in (signal.SIGKILL, signal.SIGSTOP):
            wait_for(lambda: len(ready_gateways(s)) == 2)  # Serve replaced the killed one
            started = threading.Semaphore(0)
            threads, got = stream_texts(s, ckpt, prompts, started)
            for t in threads:
                t.start()
            for _ in range(8):  # half the streams are under way
                assert started.acquire(timeout=120)
            victim = processes(s, "ray::ServeReplica:expertmesh:Gateway")[0]
            os.kill(victim, sig)
            for t in threads:
                t.join(180)
            if sig == signal.SIGSTOP:
                os.kill(victim, signal.SIGCONT)
            assert sorted(got) == list(range(16)), sig
            assert {i: errors for i, (_, errors) in got.items() if errors} == {}, sig
            assert got == want, sig
    finally:
        assert s.stop() == set()


def test_a_worker_restart_is_seen_by_every_gateway(ckpt, tmp_path):
    """SIGKILL one of the two shared workers while 16 greedy streams run across two gateways:
    the pool awaits its restart once, both gateways reconnect, and 16/16 streams finish equal
    to their runs without the failure, with no SSE error event."""
    prompts = prompts_of([4 + i % 5 for i in range(16)], ModelConfig.from_dir(ckpt).vocab_size, 2)
    s = serve(ckpt, tmp_path, "--gateways", "2", "--transport", "grpc")
    try:
        wait_for(lambda: len(ready_gateways(s)) == 2)
        threads, want = stream_texts(s, ckpt, prompts)
        run_all(threads)
        before = {w["index"]: w["pid"] for w in health(s)["expert_workers"]}
        started = threading.Semaphore(0)
        threads, got = stream_texts(s, ckpt, prompts, started)
        for t in threads:
            t.start()
        for _ in range(8):
            assert started.acquire(timeout=120)
        os.kill(before[0], signal.SIGKILL)
        for t in threads:
            t.join(180)
        assert {i: errors for i, (_, errors) in got.items() if errors} == {}
        assert got == want
        after = {w["index"]: w["pid"] for w in health(s)["expert_workers"]}
        assert after[0] != before[0] and after[1] == before[1]  # restarted once, the other kept
        assert all(g["workers"] for g in ready_gateways(s)) and len(ready_gateways(s)) == 2
    finally:
        assert s.stop() == set()


def test_gateways_autoscale_up_under_load_and_down_when_idle(ckpt, tmp_path):
    """--gateways auto: the gateway count goes 1 -> 2 under load and back to 1 when idle, and
    every request of the load succeeds."""
    vocab = ModelConfig.from_dir(ckpt).vocab_size
    s = serve(
        ckpt,
        tmp_path,
        "--gateways",
        "auto",
        "--min-gateways",
        "1",
        "--max-gateways",
        "2",
        "--target-gateway-requests",
        "2",
    )
    counts, failures, stop = [], [], threading.Event()
    try:
        wait_for(lambda: len(ready_gateways(s)) == 1)
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)

        def load(i: int) -> None:
            prompt = prompts_of([6], vocab, seed=i)[0]
            while not stop.is_set():
                try:
                    r = client.completions.create(
                        model=str(ckpt),
                        prompt=prompt,
                        max_tokens=64,
                        temperature=0,
                        extra_body={"ignore_eos": True},
                    )
                    if r.usage.completion_tokens != 64:
                        failures.append(r.usage.completion_tokens)
                except Exception as e:  # noqa: BLE001 - any failed request fails the test
                    failures.append(repr(e))

        clients = [threading.Thread(target=load, args=(i,)) for i in range(12)]
        for t in clients:
            t.start()

        def scaled_to(n: int):
            got = len(ready_gateways(s))
            counts.append(got)
            return got == n

        wait_for(lambda: scaled_to(2), timeout_s=180, every_s=1)
        time.sleep(5)  # both serve a while
        stop.set()
        for t in clients:
            t.join(120)
        wait_for(lambda: scaled_to(1) and len(health(s)["gateways"]) == 1, timeout_s=180, every_s=1)
        assert failures == []
        assert counts[0] == 1 and 2 in counts and counts[-1] == 1, counts
    finally:
        stop.set()
        assert s.stop() == set()

"""The engine loop thread: requests joining at different times, aborts, bad requests."""

from __future__ import annotations

import queue
import random
import threading
import time

from conftest import CONFIGS
from expertmesh.router.engine import LLMEngine
from expertmesh.router.loop import EngineLoop
from expertmesh.router.sampling import SamplingParams


def collect(loop, rid, prompt, params):
    q: queue.Queue = queue.Queue()
    loop.submit(rid, prompt, params, q.put)
    return q


def drain(q, timeout=60):
    events = []
    while not events or events[-1].finish_reason is None:
        events.append(q.get(timeout=timeout))
    return events


def requests(n=16):
    rng = random.Random(0)
    out = []
    for i in range(n):
        prompt = [rng.randrange(5, 400) for _ in range(rng.randrange(1, 40))]
        if i % 2:
            p = SamplingParams(max_tokens=rng.randrange(4, 24), temperature=0)
        else:
            p = SamplingParams(max_tokens=rng.randrange(4, 24), temperature=0.9, top_k=50, seed=i)
        out.append((prompt, p))
    return out


def test_requests_joining_at_different_times_match_running_alone(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    alone_engine = LLMEngine.from_checkpoint(path, num_shards=2)
    reqs = requests()
    alone = [alone_engine.generate([p], sp)[0].token_ids for p, sp in reqs]

    loop = EngineLoop(LLMEngine.from_checkpoint(path, num_shards=2))
    try:
        queues = []
        for i, (p, sp) in enumerate(reqs):
            queues.append(collect(loop, f"r{i}", p, sp))
            time.sleep(0.005 * (i % 4))  # arrive while others are mid-generation
        got = [[ev.token_id for ev in drain(q)] for q in queues]
    finally:
        loop.stop()
    assert got == alone


def test_abort_frees_the_slot_and_bad_requests_error(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    loop = EngineLoop(LLMEngine.from_checkpoint(path))
    try:
        q = collect(loop, "long", [5, 6], SamplingParams(max_tokens=10_000, ignore_eos=True))
        q.get(timeout=30)
        loop.abort("long")
        assert drain(q)[-1].finish_reason == "abort"
        deadline = time.time() + 10
        while loop.counts() != (0, 0) and time.time() < deadline:
            time.sleep(0.01)
        assert loop.counts() == (0, 0)
        bad = drain(collect(loop, "bad", [5, 10**7], SamplingParams()))
        assert bad[-1].finish_reason == "error" and "vocabulary" in bad[-1].error
        ok = drain(collect(loop, "ok", [5, 6], SamplingParams(max_tokens=3, ignore_eos=True)))
        assert [e.token_id is not None for e in ok] == [True] * 3
    finally:
        loop.stop()
    assert not any(t.name == "engine-loop" and t.is_alive() for t in threading.enumerate())


def test_a_draw_that_fails_ends_only_its_own_request(make_checkpoint):
    """A request whose draw raises (here a structured-output matcher that breaks) gets an
    internal error; its batchmates keep going, with the tokens they get alone."""
    from expertmesh.router.events import ErrorKind

    class BrokenMatcher:
        done = False

        def mask(self, row):
            raise RuntimeError("the matcher broke")

        def accept(self, token):
            return False

    engine = LLMEngine.from_checkpoint(make_checkpoint(**CONFIGS["top2of8-shared1"]), num_shards=2)
    p = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    want = engine.generate([[5, 6, 7]], p)[0].token_ids
    engine.add_request("bad", [5, 6, 7], p)
    engine.add_request("ok", [5, 6, 7], p)
    engine.requests["bad"].grammar = BrokenMatcher()
    events = []
    while engine.has_work():
        events += engine.step()
    bad = [e for e in events if e.request_id == "bad"]
    assert len(bad) == 1 and bad[0].finish_reason == "error"
    assert bad[0].error_kind == ErrorKind.INTERNAL and "the matcher broke" in bad[0].error
    assert [e.token_id for e in events if e.request_id == "ok"] == want
    assert engine.num_running == 0 and "bad" not in engine.requests

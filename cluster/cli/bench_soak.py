"""`expertmesh bench soak`: hold mixed traffic for a long time; watch for leaks and failures.

Why: each fix of the hardening issue is tested once, but the service must also stay up and flat
for hours of what real clients send: streams dropped mid-way and bad input among good requests.
A per-request leak (a slot, a stream, a buffer) shows only as memory that grows or throughput
that sinks over thousands of requests. `streams` client loops send request after request (good:
200 and [DONE]; bad: its 4xx; dropped after a random number of chunks); every `interval_s` a
markdown row (tok/s, outcomes, RSS of each kind of server process); then a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import time
from collections import Counter
from pathlib import Path

import httpx
from pydantic import BaseModel, Field, model_validator

from ..config import ServeArgs
from .local_server import start_server, stop_server

# A bad request of each kind and the status it must get.
EXPECTED = dict.fromkeys(["malformed_json", "wrong_types", "too_long_prompt", "nested_json"], 400)
EXPECTED |= {"unknown_model": 404, "huge_body": 413}
HUGE_BYTES = ServeArgs.model_fields["max_body_bytes"].default + 2**20  # past serve's default
COLUMNS = ["ok", "dropped", "refused", "busy", "error_event"]  # outcomes in the rows
LOG_ERROR = re.compile(r"^(?:\S*\(\S+ pid=\d+\)\S* )?([\w.]+(?:Error|Exception)): ", re.M)
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20
TIMEOUT_S = 120  # a single request's limit: a hung one is a failure, not a hung benchmark


class SoakArgs(BaseModel):
    url: str | None = Field(None, description="a running server; default: start one here")
    api_key: str | None = Field(None, description="API key of that server")
    model: str | None = Field(None, description="checkpoint for the server started here")
    minutes: float = Field(30, gt=0, description="how long to hold the load")
    streams: int = Field(32, ge=1, description="concurrent client loops")
    disconnect_rate: float = Field(0.2, ge=0, le=1, description="fraction dropped mid-stream")
    bad_rate: float = Field(0.1, ge=0, le=1, description="fraction that are bad input")
    max_tokens: int = Field(64, ge=1, description="tokens per good answer")
    interval_s: float = Field(60, gt=0, description="seconds between report rows")
    out: str | None = Field(None, description="write the results as JSON to this path")
    seed: int = Field(0, description="seed of the clients' choices")

    @model_validator(mode="after")
    def _rates(self):
        if self.bad_rate + self.disconnect_rate > 1:
            raise ValueError("bad_rate + disconnect_rate must be at most 1")
        return self


class Tally:
    """What the clients saw: live token count, requests by kind and status, and outcomes."""

    def __init__(self):
        self.tokens = 0
        self.status: Counter = Counter()  # "good 200", "bad:huge_body 413", ...
        self.outcome: Counter = Counter()  # ok, refused, dropped, busy, error_event, FAIL:...
        self.examples: list[str] = []  # the first unexpected results, for the summary

    def add(self, kind: str, status: int | str, outcome: str, detail: str = "") -> None:
        self.status[f"{kind} {status}"] += 1
        self.outcome[outcome] += 1
        if outcome.startswith("FAIL") and len(self.examples) < 20:
            self.examples.append(f"{kind} {status} {outcome} {detail}"[:300])


def bad_bodies(model: str, ctx: int) -> dict[str, bytes]:
    """One body of each bad kind, made once; `ctx` is the model's context length."""
    hi, long = [{"role": "user", "content": "Hi"}], " ".join(map(str, range(ctx)))  # >= ctx tokens
    bodies = {"wrong_types": {"model": model, "messages": "Hi", "max_tokens": "ten"}}
    bodies["unknown_model"] = {"model": "no-such-model", "messages": hi}
    bodies["huge_body"] = {"model": model, "messages": hi, "pad": "x" * HUGE_BYTES}
    bodies["too_long_prompt"] = {"model": model, "messages": [{"role": "user", "content": long}]}
    out = {k: json.dumps(v).encode() for k, v in bodies.items()}
    out["malformed_json"] = b'{"model": "' + model.encode() + b'", "messages": [{"role": '
    out["nested_json"] = b'{"model": "x", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    return out


async def _bad(client: httpx.AsyncClient, kind: str, body: bytes, tally: Tally) -> None:
    r = await client.post("/v1/chat/completions", content=body)  # the client's JSON content-type
    status, want = r.status_code, EXPECTED[kind]
    outcome = "refused" if status == want else "busy" if status == 429 else "FAIL:status"
    tally.add("bad:" + kind, status, outcome, f"(want {want}) {r.text[:200]}")


async def _good(client, payload: dict, drop_after: int | None, tally: Tally) -> None:
    """A streaming chat request, read to [DONE] or dropped after `drop_after` content chunks."""
    kind, chunks, usage, error, done = "good" if drop_after is None else "drop", 0, 0, None, False
    async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        if r.status_code != 200:
            outcome = "busy" if r.status_code == 429 else "FAIL:status"
            text = (await r.aread()).decode("utf-8", "replace")
            return tally.add(kind, r.status_code, outcome, text)
        async for line in r.aiter_lines():
            if done := line == "data: [DONE]":
                break
            event = json.loads(line[6:]) if line.startswith("data: ") else {}
            error = event.get("error", error)
            usage = (event.get("usage") or {}).get("completion_tokens", usage)
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                chunks, tally.tokens = chunks + 1, tally.tokens + 1
            if drop_after is not None and chunks >= drop_after:
                return tally.add(kind, 200, "dropped")  # leaving closes the connection mid-stream
    tally.tokens += max(0, usage - chunks)  # a token is not always a chunk of text
    outcome = "error_event" if error else "ok" if done else "FAIL:truncated"
    tally.add(kind, 200, outcome, json.dumps(error) if error else f"{chunks} chunks")


async def _loop(i: int, client, model: str, bad: dict, a: SoakArgs, tally, deadline) -> None:
    """One client: a request after another until `deadline`, each bounded by TIMEOUT_S."""
    rng, n = random.Random(a.seed * 100_003 + i), 0
    while time.monotonic() < deadline:
        n, x, kind = n + 1, rng.random(), "good"
        try:
            if x < a.bad_rate:
                kind = "bad:" + rng.choice(sorted(bad))
                await _bad(client, kind[4:], bad[kind[4:]], tally)
                continue
            drop = rng.randrange(a.max_tokens) if x < a.bad_rate + a.disconnect_rate else None
            kind = "good" if drop is None else "drop"
            payload = {"model": model, "max_tokens": a.max_tokens, "ignore_eos": True}
            payload |= {"messages": [{"role": "user", "content": f"Client {i}, request {n}."}]}
            payload |= {"temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randrange(2**31)}
            payload |= {"stream": True, "stream_options": {"include_usage": True}}
            await _good(client, payload, drop, tally)
        except Exception as e:  # httpx's, or a malformed event: a failure, and the loop goes on
            tally.add(kind, f"exc:{type(e).__name__}", "FAIL:exception", str(e))


def _procs() -> dict[int, tuple[int, str]]:  # {pid: (parent pid, state)}, from /proc
    out = {}
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):  # not a process, or gone
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(d.name)] = (int(fields[1]), fields[0])
    return out


def _family(root: int) -> list[int]:
    """`root` and every process below it."""
    procs, out = _procs(), [root]
    for pid in out:  # `out` grows as it goes: a breadth-first walk of the tree
        out += [p for p, (parent, _) in procs.items() if parent == pid]
    return out


def _kind(pid: int) -> str:
    """What a process is, from its command line: ray::ExpertWorker, raylet, log_monitor.py..."""
    argv = [x for x in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0") if x]
    if argv[0].startswith("ray::"):  # an actor or task names itself ray::Class[.method]
        return argv[0].split()[0].split(".")[0]
    if "python" in Path(argv[0]).name:  # python [-flags] script.py|-m module ...
        argv = [x for x in argv[1:] if not x.startswith("-")] or argv
    return Path(argv[0]).name


def rss_by_kind(root: int) -> dict[str, dict]:
    """{kind: {"n": processes, "mb": their RSS summed}} over the process tree of `root`."""
    n, mb = Counter(), Counter()
    for pid in _family(root):
        with contextlib.suppress(OSError, IndexError, ValueError, UnicodeDecodeError):  # gone
            kind, pages = _kind(pid), int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            if pages:  # zombies have none
                n[kind], mb[kind] = n[kind] + 1, mb[kind] + pages * PAGE_MB
    return {k: {"n": n[k], "mb": mb[k]} for k in sorted(n)}


async def _report(a: SoakArgs, tally: Tally, root, kinds: list[str], t0: float) -> list[dict]:
    """A row every interval_s until the end: tok/s and outcomes over the interval, RSS now."""
    rows, last_t, last_tokens, last, end = [], t0, 0, Counter(), t0 + 60 * a.minutes
    names = [k.split(":")[-1] for k in kinds] + ["all"] * any(kinds)  # Gateway, not ray::Serve...
    head = ["t s", "tok/s", *COLUMNS, "FAIL", *[f"{k} MB" for k in names]]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|", flush=True)
    for i in range(1, math.ceil(60 * a.minutes / a.interval_s) + 1):
        await asyncio.sleep(max(0.0, min(t0 + i * a.interval_s, end) - time.monotonic()))
        now, outcomes = time.monotonic(), dict(tally.outcome - last)
        row = {"t_s": round(now - t0, 1), "tok_s": (tally.tokens - last_tokens) / (now - last_t)}
        row |= {"outcomes": outcomes, "fail": sum(v for k, v in outcomes.items() if "FAIL" in k)}
        rss = row["rss_mb"] = rss_by_kind(root) if root else {}
        cells = [f"{row['t_s']:.0f}", f"{row['tok_s']:.1f}"]
        cells += [str(outcomes.get(c, 0)) for c in COLUMNS] + [str(row["fail"])]
        cells += [f"{rss[k]['mb']:.0f}" if k in rss else "-" for k in kinds]
        cells += [f"{sum(v['mb'] for v in rss.values()):.0f}"] if kinds else []
        print("| " + " | ".join(cells) + " |", flush=True)
        rows.append(row)
        last_t, last_tokens, last = now, tally.tokens, tally.outcome.copy()
    return rows


async def _soak(a: SoakArgs, url: str, root: int | None) -> tuple[list[dict], Tally, dict]:
    headers = {"content-type": "application/json", "authorization": f"Bearer {a.api_key}"}
    limits = httpx.Limits(max_connections=a.streams + 2, max_keepalive_connections=a.streams + 2)
    client = httpx.AsyncClient(base_url=url, headers=headers, timeout=TIMEOUT_S, limits=limits)
    async with client:
        card = (await client.get("/v1/models")).raise_for_status().json()["data"][0]
        bad = bad_bodies(card["id"], card.get("max_model_len") or 2**17)
        tally, idle, t0 = Tally(), rss_by_kind(root) if root else {}, time.monotonic()
        each = (client, card["id"], bad, a, tally, t0 + 60 * a.minutes)
        loops = [asyncio.create_task(_loop(i, *each)) for i in range(a.streams)]
        try:
            rows = await _report(a, tally, root, sorted(idle), t0)
        finally:  # requests still running at the end are dropped, and not counted
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
    return rows, tally, idle


def _summary(res: dict) -> None:
    print("\n| request | status | count |\n|---|---|---|")
    for key, n in sorted(res["status"].items()):
        print("| " + " | ".join(key.rsplit(" ", 1)) + f" | {n} |")
    fails = {k: v for k, v in res["outcome"].items() if k.startswith("FAIL")}
    print(f"\noutcomes: {dict(res['outcome'])}\nunexpected: {sum(fails.values())}", flush=True)
    print("".join(f"- {e}\n" for e in res["examples"]), end="")
    first, end = res["rows"][0]["rss_mb"], res["rows"][-1]["rss_mb"]
    if end:
        print("\nRSS MB: idle before the load, after the first interval, at the end; growth since")
        print("| process | n | idle | first | end | growth MB | growth % |\n" + "|---" * 7 + "|")
    for k, e in sorted(end.items()):
        f, i = first.get(k, {"mb": 0}), res["rss_idle"].get(k, {"mb": 0})
        pct = f"{100 * (e['mb'] / f['mb'] - 1):+.1f}" if f["mb"] else "-"
        cells = [k, e["n"], f"{i['mb']:.0f}", f"{f['mb']:.0f}", f"{e['mb']:.0f}"]
        print("| " + " | ".join(map(str, [*cells, f"{e['mb'] - f['mb']:+.0f}", pct])) + " |")
    tok0, tok1 = res["rows"][0]["tok_s"], res["rows"][-1]["tok_s"]
    change = (tok1 - tok0) / (tok0 or 1)
    print(f"\ntok/s: first interval {tok0:.1f}, last interval {tok1:.1f} ({change:+.0%})")
    print(f"exceptions in the server's log: {dict(res['server_exceptions']) or 'none'}")
    print(f"processes left behind: {res['left_behind'] or 'none'}", flush=True)


def bench_soak(a: SoakArgs) -> dict:
    """Hold the load, print a row per interval and a summary; the results as a dict."""
    proc, url, log_path, left = None, a.url, None, []
    if url is None:
        proc, url, log_path = start_server(2, "grpc", a.model, "soak-serve-")
    url = url.rstrip("/").removesuffix("/v1")
    where = a.url or f"built-in model, 2 workers, grpc (server log, kept: {log_path})"
    args = a.model_dump(exclude={"api_key"})  # no secret in the output
    print(f"# bench soak: {where}; {args}", flush=True)
    try:
        rows, tally, idle = asyncio.run(_soak(a, url, proc.pid if proc else None))
    finally:
        if proc is not None:
            left = stop_server(proc)
    res = {"args": args, "url": url, "server_log": log_path, "left_behind": left, "rows": rows}
    log = Path(log_path).read_text(errors="replace") if log_path else ""
    res |= {"rss_idle": idle, **vars(tally), "server_exceptions": Counter(LOG_ERROR.findall(log))}
    _summary(res)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res

"""`expertmesh bench http`: throughput and time-to-first-token through the HTTP API.

At each concurrency C, C clients each send `requests` streaming chat requests one after
another (ignore_eos, so every answer has max_tokens tokens). Output tokens/s is all generated
tokens over the wall time of the level; TTFT is measured per request at the client.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time

from ..runtime.resources import free_port
from .args import BenchHttpArgs


async def _one(client, model: str, i: int, max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Request {i}: tell me a story."}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft if ttft is not None else time.perf_counter() - t0, tokens


async def _level(url: str, key: str | None, c: int, a: BenchHttpArgs) -> dict:
    import openai

    client = openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=600
    )
    model = (await client.models.list()).data[0].id
    await _one(client, model, -1, 4)  # warm-up

    async def worker(w):
        return [
            await _one(client, model, w * a.requests + r, a.max_tokens) for r in range(a.requests)
        ]

    t0 = time.perf_counter()
    results = [x for batch in await asyncio.gather(*(worker(w) for w in range(c))) for x in batch]
    wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in results)
    await client.close()
    return {
        "concurrency": c,
        "tok_s": sum(n for _, n in results) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
    }


def _start_server(a: BenchHttpArgs) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "expertmesh.cluster.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(a.workers),
        "--transport",
        a.transport,
    ]
    if a.model:
        cmd += ["--model", a.model]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    for line in proc.stdout:
        if "serving" in line:
            return proc, f"http://127.0.0.1:{port}"
    raise RuntimeError("the server did not start")


def bench_http(a: BenchHttpArgs) -> list[dict]:
    proc, url = (None, a.url) if a.url else _start_server(a)
    try:
        rows = [asyncio.run(_level(url, a.api_key, c, a)) for c in a.concurrency]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    base = rows[0]["tok_s"]
    print(
        f"# bench http: {a.url or 'built-in model, ' + a.transport + f', {a.workers} workers'}; "
        f"{a.requests} requests per client, {a.max_tokens} tokens each"
    )
    print("| concurrency | output tok/s | vs concurrency 1 | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.1f}x | "
            f"{1e3 * r['ttft_p50']:.0f} | {1e3 * r['ttft_p99']:.0f} |"
        )
    return rows

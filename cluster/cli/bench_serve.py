"""`expertmesh bench serve`: latency and throughput of an OpenAI-compatible server under load.

At each concurrency C, C clients each send `requests` streaming requests one after another with
the official `openai` client (chat or completions, a prompt of about `prompt_tokens` tokens,
`max_tokens` with `ignore_eos`, temperature 0). Every request is one raw sample: time to first
token, the gaps between the chunks that carried text (inter-token latency), end-to-end time,
tokens, and its error if it failed (an HTTP status, `connection`, `timeout`, or `stream_error`
for an error event mid-stream). A level's summary is computed from its samples only: exact
percentiles over all of them, throughput as the successful requests' tokens over the level's
wall time. So results merge by concatenating samples (`merge_level`) and re-plot from the JSON.

With `--ray-address` the clients run as Ray tasks spread over the cluster's nodes
(`clients_per_node` load generators per node, the level's C streams split among them); they
start together behind a barrier and their samples are merged as above.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
from pydantic import BaseModel, Field, ValidationInfo, field_validator

from ..config import Transport
from .local_server import start_server, stop_server

log = logging.getLogger(__name__)

FORMAT = "expertmesh-bench-serve/1"
PERCENTILES = (50, 90, 99)
BARRIER_TIMEOUT_S = 120  # load generators that have not started by then fail the level
WORDS = (
    "the model serves experts across nodes while every token takes a route through layers "
    "of attention and gates so requests stream back quickly under load with batching cache "
    "memory and compute shared by many clients asking about stories weather music science "
    "history travel cooking gardens rivers mountains cities"
).split()


class BenchServeArgs(BaseModel):
    url: str | None = Field(
        None, description="a running server; default: start one on the built-in model here"
    )
    api_key: str | None = Field(None, description="API key of that server")
    model: str | None = Field(None, description="checkpoint for the server started here")
    workers: int = Field(2, ge=1, description="expert workers of the server started here")
    transport: Transport = Field("grpc", description="transport of the server started here")
    gateways: str = Field(
        "1", pattern=r"^(auto|[1-9][0-9]*)$", description="gateways of the server started here"
    )
    endpoint: Literal["chat", "completions"] = Field(
        "chat", description="/v1/chat/completions or /v1/completions"
    )
    concurrency: list[int] = Field([1, 8, 32, 128], description="concurrent clients per level")
    requests: int = Field(4, ge=1, description="requests each client sends, one after another")
    prompt_tokens: int = Field(32, ge=1, description="prompt length in tokens (approximately)")
    max_tokens: int = Field(64, ge=1, description="tokens per answer (ignore_eos: exactly)")
    images: int = Field(0, ge=0, description="image parts per chat request (a VL model)")
    image_size: int = Field(224, ge=8, description="side in pixels of each (random) image")
    timeout_s: float = Field(600, gt=0, description="one request's time limit")
    out: str | None = Field(None, description="write the results (raw samples too) as JSON")
    plot: str | None = Field(
        None, description="draw latency and throughput against concurrency to this PNG"
    )
    compare: list[str] = Field(
        [], description="plot these result files (one line each) instead of running"
    )
    label: str | None = Field(None, description="this run's name in plots; default: the server")
    ray_address: str | None = Field(
        None, description="run the clients as Ray tasks spread over this cluster's nodes"
    )
    clients_per_node: int = Field(1, ge=1, description="load generators per node (--ray-address)")
    client_cpus: float = Field(
        1.0, ge=0, description="CPUs each load generator reserves on its node (--ray-address)"
    )

    # field validators (not a model one): the CLI's error names the flag from the error's field

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if any(c < 1 for c in v):
            raise ValueError("concurrency levels must be at least 1")
        return v

    @field_validator("compare")
    @classmethod
    def _needs_plot(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if v and not info.data.get("plot"):  # `plot` is declared, so validated, before
            raise ValueError("--compare needs --plot")
        return v


# ---- one request, one client loop -------------------------------------------------------------


def prompt_text(name: str, words: int) -> str:
    """A prompt of `words` filler words, different for every request name."""
    rng = random.Random(name)
    return f"Request {name}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def image_urls(count: int, size: int) -> list[str]:
    """`count` random RGB PNG images of size x size as data URLs (seeded: the same each run)."""
    import base64
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    urls = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def chat_content(prompt: str, images: list[str]) -> str | list[dict]:
    if not images:
        return prompt
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return parts + [{"type": "text", "text": prompt}]


async def one_request(
    client, endpoint: str, model: str, prompt: str, max_tokens: int, images: list[str] = ()
) -> dict:
    """Stream one request; its sample. Failures are recorded in the sample, never raised."""
    import openai

    sample = {"sent": round(time.time(), 3), "ttft": None, "e2e": None, "itl": []}
    sample |= {"tokens": 0, "prompt_tokens": None, "error": None}
    kw = dict(model=model, max_tokens=max_tokens, temperature=0, stream=True)
    kw |= dict(stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    t0 = last = time.perf_counter()
    chunks = 0
    try:
        if endpoint == "chat":
            messages = [{"role": "user", "content": chat_content(prompt, list(images))}]
            stream = await client.chat.completions.create(messages=messages, **kw)
        else:
            stream = await client.completions.create(prompt=prompt, **kw)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                c = chunk.choices[0]
                text = c.delta.content if endpoint == "chat" else c.text
                if text:
                    if sample["ttft"] is None:
                        sample["ttft"] = round(now - t0, 6)
                    else:
                        sample["itl"].append(round(now - last, 6))
                    last, chunks = now, chunks + 1
            if chunk.usage:
                sample["tokens"] = chunk.usage.completion_tokens
                sample["prompt_tokens"] = chunk.usage.prompt_tokens
        sample["e2e"] = round(time.perf_counter() - t0, 6)
        sample["tokens"] = sample["tokens"] or chunks  # a server that sends no usage
    except openai.APIStatusError as e:
        sample["error"] = str(e.status_code)
    except openai.APITimeoutError:
        sample["error"] = "timeout"
    except openai.APIConnectionError:
        sample["error"] = "connection"
    except openai.APIError:  # an error event in the stream
        sample["error"] = "stream_error"
    except Exception as e:  # anything else is counted too, by kind; the benchmark goes on
        sample["error"] = f"other:{type(e).__name__}"
    return sample


def make_client(url: str, api_key: str | None, timeout_s: float):
    import openai

    return openai.AsyncOpenAI(  # its connection pool holds 1000: enough for any level here
        base_url=url + "/v1",
        api_key=api_key or "none",
        max_retries=0,  # a 429 is a result, not something to hide
        timeout=timeout_s,
    )


async def run_clients(spec: dict, ready=None, on_done: Callable[[], None] | None = None) -> dict:
    """Clients `spec["first"]`.. of one level, `spec["streams"]` of them at once, after one
    warm-up request and `ready()` (a barrier across load generators; False: give up).
    Returns {"node", "streams", "start", "end", "samples"} (times: time.time())."""
    client = make_client(spec["url"], spec["api_key"], spec["timeout_s"])
    part = {"node": socket.gethostname(), "streams": spec["streams"], "samples": []}
    try:
        warm = prompt_text(f"warm-up-{spec['level']}-{spec['first']}", spec["words"])
        await one_request(client, spec["endpoint"], spec["model"], warm, 2)
        if ready is not None and not await ready():
            part["start"] = part["end"] = time.time()
            part["failed"] = "the other load generators did not start in time"
            return part

        urls = image_urls(spec.get("images", 0), spec.get("image_size", 224))

        async def loop(i: int) -> list[dict]:
            out = []
            for r in range(spec["requests"]):
                text = prompt_text(f"{spec['level']}-{i}-{r}", spec["words"])
                out.append(
                    await one_request(
                        client, spec["endpoint"], spec["model"], text, spec["max_tokens"], urls
                    )
                )
                if on_done is not None:
                    on_done()
            return out

        part["start"] = time.time()
        clients = range(spec["first"], spec["first"] + spec["streams"])
        runs = await asyncio.gather(*(loop(i) for i in clients))
        part["end"] = time.time()
        part["samples"] = [s for run in runs for s in run]
    finally:
        await client.close()
    return part


# ---- summaries and merging ---------------------------------------------------------------------


def percentiles(xs: list[float]) -> dict:
    """Exact percentiles (numpy's linear interpolation) and the mean; None when no samples."""
    if not xs:
        return {f"p{q}": None for q in PERCENTILES} | {"mean": None}
    vals = np.percentile(np.asarray(xs, dtype=float), PERCENTILES)
    mean = math.fsum(xs) / len(xs)  # exactly rounded: the same whatever the samples' order
    return {f"p{q}": float(v) for q, v in zip(PERCENTILES, vals)} | {"mean": mean}


def summarize(samples: list[dict], wall_s: float) -> dict:
    """A level's numbers, from its raw samples alone (latencies over successful requests)."""
    ok = [s for s in samples if s["error"] is None]
    tokens = sum(s["tokens"] for s in ok)
    prompt = [s["prompt_tokens"] for s in ok if s["prompt_tokens"] is not None]
    wall = max(wall_s, 1e-9)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": dict(sorted(Counter(s["error"] for s in samples if s["error"]).items())),
        "wall_s": wall_s,
        "req_s": len(ok) / wall,
        "tok_s": tokens / wall,
        "output_tokens": tokens,
        "prompt_tokens_mean": math.fsum(prompt) / len(prompt) if prompt else None,
        "ttft_s": percentiles([s["ttft"] for s in ok if s["ttft"] is not None]),
        "itl_s": percentiles([g for s in ok for g in s["itl"]]),
        "e2e_s": percentiles([s["e2e"] for s in ok]),
    }


def merge_level(concurrency: int, parts: list[dict]) -> dict:
    """One level from the results of several load generators (or runs): all their samples, the
    wall time from the first start to the last end, and the summary recomputed over the union
    (so percentiles are exact, never averages of percentiles)."""
    started = [p for p in parts if "start" in p]
    start = min((p["start"] for p in started), default=0.0)
    end = max((p["end"] for p in started), default=0.0)
    samples = [s for p in parts for s in p["samples"]]
    generators = [{k: v for k, v in p.items() if k != "samples"} for p in parts]
    level = {"concurrency": concurrency, "start": start, "end": end, "wall_s": end - start}
    level |= {"generators": generators, "samples": samples}
    level["summary"] = summarize(samples, end - start)
    return level


def load_results(path: str | Path) -> dict:
    """A result file, its summaries recomputed from the raw samples."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a `bench serve` result file (format {doc.get('format')!r})")
    for level in doc["levels"]:
        level["summary"] = summarize(level["samples"], level["wall_s"])
    return doc


# ---- the levels --------------------------------------------------------------------------------


async def _models_and_words(a: BenchServeArgs, url: str) -> tuple[str, int]:
    """The served model's id, and the filler words that make a prompt of about prompt_tokens
    tokens: two probes (n and 2n words) measure tokens per word and the template's overhead."""
    client = make_client(url, a.api_key, a.timeout_s)
    try:
        model = (await client.models.list()).data[0].id

        async def prompt_tokens(words: int) -> int | None:
            text = prompt_text("probe", words)
            if a.endpoint == "chat":
                msgs = [{"role": "user", "content": text}]
                r = await client.chat.completions.create(model=model, messages=msgs, max_tokens=1)
            else:
                r = await client.completions.create(model=model, prompt=text, max_tokens=1)
            return r.usage.prompt_tokens if r.usage else None

        n = max(4, a.prompt_tokens // 4)
        p1, p2 = await prompt_tokens(n), await prompt_tokens(2 * n)
    finally:
        await client.close()
    if not p1 or not p2 or p2 <= p1:
        log.warning("the server reports no prompt usage; one word per token is assumed")
        return model, a.prompt_tokens
    per_word = (p2 - p1) / n
    overhead = p1 - n * per_word
    return model, max(1, round((a.prompt_tokens - overhead) / per_word))


def _local_level(spec: dict) -> dict:
    from tqdm import tqdm

    total = spec["streams"] * spec["requests"]
    with tqdm(total=total, desc=f"concurrency {spec['level']}", unit="req", leave=False) as bar:
        part = asyncio.run(run_clients(spec, on_done=lambda: bar.update(1)))
    return merge_level(spec["level"], [part])


class Coordinator:
    """A Ray actor (async) shared by one level's load generators: a start barrier and a count
    of finished requests for the driver's progress bar."""

    def __init__(self, n: int):
        self.n, self.arrived, self.done = n, 0, 0
        self.event = asyncio.Event()

    async def arrive(self) -> bool:
        self.arrived += 1
        if self.arrived >= self.n:
            self.event.set()
        try:
            await asyncio.wait_for(self.event.wait(), BARRIER_TIMEOUT_S)
        except asyncio.TimeoutError:
            return False
        return True

    def add(self) -> None:
        self.done += 1

    def progress(self) -> tuple[int, int]:
        return self.arrived, self.done


def load_generator(spec: dict, coordinator) -> dict:
    """A Ray task: one load generator's clients of a level."""
    import ray

    async def ready() -> bool:
        return await coordinator.arrive.remote()

    part = asyncio.run(run_clients(spec, ready, on_done=lambda: coordinator.add.remote()))
    part["node_id"] = ray.get_runtime_context().get_node_id()
    return part


def split(total: int, ways: int) -> list[int]:
    """`total` as `ways` near-equal positive parts (fewer when total < ways)."""
    ways = min(total, ways)
    return [total // ways + (i < total % ways) for i in range(ways)]


def _ray_level(spec: dict, a: BenchServeArgs, nodes: int) -> dict:
    import ray
    from tqdm import tqdm

    shares = split(spec["streams"], nodes * a.clients_per_node)
    coord = ray.remote(Coordinator).options(num_cpus=0).remote(len(shares))
    task = ray.remote(load_generator).options(
        num_cpus=a.client_cpus, scheduling_strategy="SPREAD", max_retries=0
    )
    firsts = [sum(shares[:i]) for i in range(len(shares))]
    refs = [task.remote({**spec, "streams": s, "first": f}, coord) for s, f in zip(shares, firsts)]
    total = spec["streams"] * spec["requests"]
    deadline = time.monotonic() + BARRIER_TIMEOUT_S + (spec["requests"] + 1) * a.timeout_s
    try:
        with tqdm(total=total, desc=f"concurrency {spec['level']}", unit="req", leave=False) as bar:
            pending = refs
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"concurrency {spec['level']}: load generators hung")
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                bar.update(ray.get(coord.progress.remote())[1] - bar.n)
        parts = ray.get(refs)
    except BaseException:  # Ctrl-C or a hang: nothing keeps sending
        for r in refs:
            ray.cancel(r, force=True)
        raise
    finally:
        ray.kill(coord)
    failed = [p for p in parts if p.get("failed")]
    if failed:
        raise RuntimeError(
            f"concurrency {spec['level']}: {len(failed)} of {len(parts)} load generators did not "
            f"start within {BARRIER_TIMEOUT_S}s (not enough free CPUs? lower --client-cpus)"
        )
    return merge_level(spec["level"], parts)


def _ray_nodes(a: BenchServeArgs) -> tuple[int, bool]:
    """(alive nodes, whether Ray was started here). A Ray already up in this process is used."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=a.ray_address, log_to_driver=True)
    return sum(1 for n in ray.nodes() if n["Alive"]), started


def worker_exchanges(url: str) -> tuple[int, int, int] | None:
    """(exchanges, expert computations, rows) the server's expert workers have served so far,
    from /health; None when it has no workers (in-process experts) or does not say."""
    try:
        workers = httpx.get(url + "/health", timeout=10).json().get("expert_workers")
    except (httpx.HTTPError, ValueError):
        return None
    if not workers or any("batches" not in w for w in workers):
        return None
    return tuple(sum(w[k] for w in workers) for k in ("exchanges", "batches", "rows"))


def rows_per_exchange(before, after) -> dict | None:
    """The workers' batch over a level: token rows per expert computation, and exchanges per
    computation (above 1: concurrent exchanges, from several gateways, computed together)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    exchanges, batches, rows = (a - b for a, b in zip(after, before))
    return {"rows_per_batch": rows / batches, "exchanges_per_batch": exchanges / batches}


def run_levels(a: BenchServeArgs, url: str, label: str) -> dict:
    model, words = asyncio.run(_models_and_words(a, url))
    args = a.model_dump(exclude={"api_key", "compare"})  # no secret in the output
    doc = {"format": FORMAT, "label": label, "url": url, "model": model, "args": args}
    doc |= {"date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    doc |= {"host": socket.gethostname(), "prompt_words": words, "ray": None, "levels": []}
    nodes, started_ray = (0, False)
    if a.ray_address:
        nodes, started_ray = _ray_nodes(a)
        doc["ray"] = {"nodes": nodes, "clients_per_node": a.clients_per_node}
    try:
        for c in a.concurrency:
            spec = {"url": url, "api_key": a.api_key, "timeout_s": a.timeout_s, "level": c}
            spec |= {"endpoint": a.endpoint, "model": model, "words": words, "first": 0}
            spec |= {"streams": c, "requests": a.requests, "max_tokens": a.max_tokens}
            spec |= {"images": a.images, "image_size": a.image_size}
            before = worker_exchanges(url)
            level = _ray_level(spec, a, nodes) if a.ray_address else _local_level(spec)
            level["workers"] = rows_per_exchange(before, worker_exchanges(url))
            doc["levels"].append(level)
            if a.out:  # after each level: a crash later keeps what was measured
                Path(a.out).write_text(json.dumps(doc))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return doc


# ---- output: table and plot --------------------------------------------------------------------


def _trio(p: dict, scale: float, fmt: str) -> str:
    if p["p50"] is None:
        return "-"
    return " / ".join(format(scale * p[f"p{q}"], fmt) for q in PERCENTILES)


def table(doc: dict) -> str:
    """The results as a markdown table (latencies p50 / p90 / p99)."""
    levels = doc["levels"]
    base = levels[0]["summary"]["tok_s"] if levels else 0
    first = levels[0]["concurrency"] if levels else 1
    head = [
        "concurrency",
        "requests",
        "errors",
        "req/s",
        "output tok/s",
        f"vs concurrency {first}",
        "TTFT ms p50 / p90 / p99",
        "ITL ms p50 / p90 / p99",
        "E2E s p50 / p90 / p99",
        "worker rows / computation (exchanges / computation)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for level in levels:
        s = level["summary"]
        errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
        cells = [level["concurrency"], s["requests"], errors, f"{s['req_s']:.2f}"]
        cells += [f"{s['tok_s']:.1f}", f"{s['tok_s'] / base:.1f}x" if base else "-"]
        cells += [_trio(s["ttft_s"], 1e3, ".0f"), _trio(s["itl_s"], 1e3, ".1f")]
        cells += [_trio(s["e2e_s"], 1, ".2f")]
        w = level.get("workers")
        cells += [f"{w['rows_per_batch']:.1f} ({w['exchanges_per_batch']:.2f})" if w else "-"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def header(doc: dict) -> str:
    a = doc["args"]
    levels = doc["levels"]
    prompt = [lv["summary"]["prompt_tokens_mean"] for lv in levels]
    prompt = [p for p in prompt if p is not None]
    measured = f" (measured: {np.mean(prompt):.0f})" if prompt else ""
    where = doc["label"]
    if doc.get("ray"):
        r = doc["ray"]
        where += f"; clients as Ray tasks, {r['clients_per_node']} per node on {r['nodes']} nodes"
    return (
        f"# bench serve: {where}; model {doc['model']!r}, {a['endpoint']}, streaming; "
        f"{a['requests']} requests per client, prompt ~{a['prompt_tokens']} tokens{measured}, "
        f"{a['max_tokens']} tokens per answer (ignore_eos)"
    )


def plot(docs: list[dict], path: str | Path, labels: list[str] | None = None) -> list[str]:
    """Latency (p50 solid, p99 dashed) and throughput against concurrency, one line per run.
    Returns the runs' labels as drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [d["label"] for d in docs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    panels = [
        (axes[0, 0], "ttft_s", 1e3, "time to first token, ms (solid p50, dashed p99)"),
        (axes[0, 1], "itl_s", 1e3, "inter-token latency, ms (solid p50, dashed p99)"),
        (axes[1, 0], "e2e_s", 1, "end-to-end latency, s (solid p50, dashed p99)"),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (doc, label) in enumerate(zip(docs, labels)):
        color = colors[i % len(colors)]
        cs = [lv["concurrency"] for lv in doc["levels"]]
        sums = [lv["summary"] for lv in doc["levels"]]
        for ax, key, scale, _ in panels:
            for q, style in (("p50", "-"), ("p99", "--")):
                ys = [scale * s[key][q] if s[key][q] is not None else math.nan for s in sums]
                ax.plot(cs, ys, style, marker="o", color=color)
        ax = axes[1, 1]
        ax.plot(cs, [s["tok_s"] for s in sums], "-", marker="o", color=color, label=label)
    for ax, _, _, title in [*panels, (axes[1, 1], None, None, "output tokens/s")]:
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ticks = sorted({lv["concurrency"] for d in docs for lv in d["levels"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrency")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[1, 1].legend(fontsize=8)  # the runs, by color; the titles say which line is which
    fig.suptitle("expertmesh bench serve: " + ", ".join(labels), fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return labels


def compare(a: BenchServeArgs) -> list[dict]:
    """Plot existing result files, one line each; print their tables."""
    docs = [load_results(p) for p in a.compare]
    labels = [d.get("label") or Path(p).stem for d, p in zip(docs, a.compare)]
    dup = {x for x in labels if labels.count(x) > 1}
    labels = [f"{x} ({Path(p).stem})" if x in dup else x for x, p in zip(labels, a.compare)]
    for doc, label in zip(docs, labels):
        print(header({**doc, "label": label}) + "\n" + table(doc) + "\n", flush=True)
    plot(docs, a.plot, labels)
    print(f"plot: {a.plot}")
    return docs


# ---- the server started here -------------------------------------------------------------------


def bench_serve(a: BenchServeArgs) -> dict | list[dict]:
    """Run the levels (or, with --compare, plot existing results); print the table."""
    if a.compare:
        return compare(a)
    proc, url = None, a.url
    label = a.label or a.url or f"built-in model, {a.transport}, {a.workers} workers"
    if not a.label and a.url is None and a.gateways != "1":
        label += f", {a.gateways} gateways"
    if url is None:
        if a.ray_address:
            log.warning("the server started here listens on 127.0.0.1: only this node reaches it")
        extra = ["--gateways", a.gateways]
        proc, url, log_path = start_server(
            a.workers, a.transport, a.model, "bench-serve-", extra=extra
        )
        log.info("server at %s (log: %s)", url, log_path)
    url = url.rstrip("/").removesuffix("/v1")
    try:
        doc = run_levels(a, url, label)
    finally:
        if proc is not None:
            stop_server(proc)
    print(header(doc) + "\n" + table(doc), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(doc))
        print(f"results: {a.out}")
    if a.plot:
        plot([doc], a.plot)
        print(f"plot: {a.plot}")
    return doc

"""`bench serve` against a fake OpenAI-compatible server (in a thread): exact percentiles over
merged samples, errors counted by status, JSON round trip, PNG plots, --compare, and the Ray
path with a local Ray (slow)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter

import numpy as np
import pytest
import uvicorn
from expertmesh.cluster.cli import bench_serve as bs
from expertmesh.cluster.cli.main import build_parser, main
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_app(statuses: Counter) -> FastAPI:
    """Streams max_tokens one-word chunks and a usage chunk. A prompt counts 3 tokens a word
    plus 5 (so the benchmark has to calibrate). Measured requests ("Request L-i-r: ...") get a
    429 when i*r % 5 == 1, a 500 when it is 2, an error event mid-stream when it is 3; the
    statuses it gave them are counted in `statuses`."""
    app = FastAPI()

    def error(status: int) -> JSONResponse:
        body = {"error": {"message": "no", "type": "server_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0}]}

    async def complete(request: Request, chat: bool):
        body = await request.json()
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        ptok = 3 * len(prompt.split()) + 5
        name = prompt.split(":")[0].removeprefix("Request ")
        kind = -1
        if name.count("-") == 2 and name.replace("-", "").isdigit():
            _, i, r = map(int, name.split("-"))
            kind = i * r % 5
        if kind in (1, 2):
            statuses[429 if kind == 1 else 500] += 1
            return error(429 if kind == 1 else 500)
        if kind >= 0:
            statuses["stream_error" if kind == 3 else 200] += 1
        n = body["max_tokens"]
        obj = "chat.completion" if chat else "text_completion"
        usage = {"prompt_tokens": ptok, "completion_tokens": n, "total_tokens": ptok + n}
        if not body.get("stream"):
            choice = {"index": 0, "finish_reason": "length", "logprobs": None}
            choice |= {"message": {"role": "assistant", "content": "x"}} if chat else {"text": "x"}
            head = {"id": "c", "object": obj, "created": 0, "model": "fake"}
            return head | {"choices": [choice], "usage": usage}

        async def events():
            base = {"id": "c", "object": obj + ".chunk" * chat, "created": 0, "model": "fake"}
            for t in range(n):
                if kind == 3 and t == n // 2:
                    yield 'data: {"error": {"message": "worker died", "type": "server_error"}}\n\n'
                    return
                choice = {"index": 0, "finish_reason": None, "logprobs": None}
                choice |= {"delta": {"content": f" w{t}"}} if chat else {"text": f" w{t}"}
                yield f"data: {json.dumps(base | {'choices': [choice]})}\n\n"
                await asyncio.sleep(0.001)
            yield f"data: {json.dumps(base | {'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, False)

    return app


@pytest.fixture
def fake_server():
    """(url, statuses) of a fake server on a free loopback port, in a thread."""
    statuses: Counter = Counter()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(fake_app(statuses), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", statuses
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def sample(ttft, e2e, itl: list[float], tokens: int = 4, error=None) -> dict:
    out = {"sent": 0.0, "ttft": ttft, "e2e": e2e, "itl": itl, "tokens": tokens}
    return out | {"prompt_tokens": 10, "error": error}


def is_png(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_args_have_defaults_and_descriptions():
    for name, field in bs.BenchServeArgs.model_fields.items():
        assert not field.is_required() and field.description, name
    with pytest.raises(ValueError, match="needs --plot"):
        bs.BenchServeArgs(compare=["a.json"])
    with pytest.raises(ValueError, match="at least 1"):
        bs.BenchServeArgs(concurrency=[0])


def test_cli_has_bench_serve_and_no_bench_http():
    p = build_parser()
    ns = p.parse_args(["bench", "serve", "--concurrency", "1", "2", "--ray-address", "auto"])
    assert ns.concurrency == [1, 2] and ns.ray_address == "auto" and ns.clients_per_node == 1
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "http"])


def test_compare_without_plot_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--compare", "x.json"])
    assert e.value.code == 2 and "needs --plot" in capsys.readouterr().err


def test_merge_gives_exact_percentiles_over_all_samples():
    rng = np.random.default_rng(0)
    # two load generators with very different latencies and different sample counts
    fast = [sample(float(t), 1 + float(t), [0.01] * 3) for t in rng.uniform(0.01, 0.02, 90)]
    slow = [sample(float(t), 5 + float(t), [0.5] * 3) for t in rng.uniform(1.0, 2.0, 10)]
    slow.append(sample(None, None, [], 0, error="429"))
    a = {"node": "a", "streams": 3, "start": 100.0, "end": 104.0, "samples": fast}
    b = {"node": "b", "streams": 1, "start": 101.0, "end": 110.0, "samples": slow}
    level = bs.merge_level(4, [a, b])
    s = level["summary"]
    ttft = [x["ttft"] for x in fast + slow if x["error"] is None]
    for q in (50, 90, 99):
        assert s["ttft_s"][f"p{q}"] == pytest.approx(np.percentile(ttft, q), abs=1e-12)
    # not the average of the generators' own percentiles
    pa, pb = (bs.summarize(p["samples"], 1)["ttft_s"]["p99"] for p in (a, b))
    assert abs(s["ttft_s"]["p99"] - (pa + pb) / 2) > 0.1
    itl = [0.01] * 270 + [0.5] * 30
    assert s["itl_s"]["p90"] == pytest.approx(np.percentile(itl, 90))
    assert s["itl_s"]["p99"] == pytest.approx(0.5)
    assert s["requests"] == 101 and s["ok"] == 100 and s["errors"] == {"429": 1}
    assert level["wall_s"] == 10.0 and s["tok_s"] == pytest.approx(400 / 10)
    assert s["req_s"] == pytest.approx(10.0)
    assert [g["node"] for g in level["generators"]] == ["a", "b"]
    assert all("samples" not in g for g in level["generators"])
    # merging a merge with nothing changes nothing; splitting samples differently neither
    again = bs.merge_level(4, [{"start": 100.0, "end": 110.0, "samples": slow + fast}])
    assert again["summary"] == s


def test_split():
    assert bs.split(8, 3) == [3, 3, 2] and bs.split(2, 4) == [1, 1] and bs.split(5, 1) == [5]


def test_connection_error_is_counted_apart():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        client = bs.make_client(f"http://127.0.0.1:{port}", None, 5)
        try:
            return await bs.one_request(client, "chat", "m", "hi", 4)
        finally:
            await client.close()

    out = asyncio.run(go())
    assert out["error"] == "connection" and out["ttft"] is None


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_run_counts_errors_by_status_and_round_trips(fake_server, tmp_path, capsys, endpoint):
    url, statuses = fake_server
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = bs.BenchServeArgs(
        url=url + "/v1",
        endpoint=endpoint,
        concurrency=[1, 4, 6],
        requests=3,
        prompt_tokens=50,
        max_tokens=8,
        out=str(out),
        plot=str(png),
        label="fake",
    )
    doc = bs.bench_serve(args)
    printed = capsys.readouterr().out
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 4, 6]
    samples = [x for lv in doc["levels"] for x in lv["samples"]]
    assert len(samples) == 3 * (1 + 4 + 6)
    errors = Counter(x["error"] for x in samples if x["error"])
    want = {"429": statuses[429], "500": statuses[500], "stream_error": statuses["stream_error"]}
    assert errors == want and all(want.values())
    assert sum(lv["summary"]["ok"] for lv in doc["levels"]) == statuses[200]
    ok = [x for x in samples if x["error"] is None]
    assert all(x["tokens"] == 8 and len(x["itl"]) == 7 for x in ok)
    # calibrated to 50 tokens: 3 a word + 5, and the prefix "Request L-i-r:" is 2 words
    assert all(abs(x["prompt_tokens"] - 50) <= 6 for x in ok)
    for lv in doc["levels"]:
        s = lv["summary"]
        assert s["ttft_s"]["p50"] <= s["ttft_s"]["p90"] <= s["ttft_s"]["p99"] <= s["e2e_s"]["p99"]
        assert s["tok_s"] == pytest.approx(8 * s["ok"] / lv["wall_s"])
    assert "| concurrency | requests | errors |" in printed and "429: " in printed
    assert "api_key" not in out.read_text()
    back = bs.load_results(out)
    assert json.loads(json.dumps(doc)) == back  # the summaries recompute to the same numbers
    assert bs.table(back) == bs.table(doc)
    assert is_png(png) == (1100, 800)


def make_result(path, label: str, scale: float) -> None:
    levels = []
    for c in (1, 8, 32):
        samples = [sample(scale * c * 0.01, scale * c * 0.1, [scale * 0.005] * 7, 8)] * c
        levels.append(bs.merge_level(c, [{"start": 0.0, "end": scale, "samples": samples}]))
    doc = {"format": bs.FORMAT, "label": label, "url": "x", "model": "m", "ray": None}
    doc |= {"args": bs.BenchServeArgs().model_dump(exclude={"api_key", "compare"})}
    path.write_text(json.dumps(doc | {"levels": levels}))


def test_compare_plots_several_files_without_running(tmp_path, capsys, monkeypatch):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    make_result(a, "before", 2.0)
    make_result(b, "after", 1.0)
    make_result(c, "after", 0.5)  # same label: told apart by file name
    monkeypatch.setattr(bs, "run_levels", lambda *_: pytest.fail("--compare must not run"))
    drawn = []
    real_plot = bs.plot

    def plot(docs, path, labels):
        drawn.extend(labels)
        return real_plot(docs, path, labels)

    monkeypatch.setattr(bs, "plot", plot)
    png = tmp_path / "cmp.png"
    argv = ["bench", "serve", "--compare", str(a), str(b), str(c), "--plot", str(png)]
    assert main(argv) == 0
    assert drawn == ["before", "after (b)", "after (c)"]
    out = capsys.readouterr().out
    assert out.count("| concurrency |") == 3 and "# bench serve: before" in out
    is_png(png)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    bad = ["bench", "serve", "--compare", str(tmp_path / "bad.json"), "--plot", str(png)]
    assert main(bad) == 1  # a one-line error naming the file


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_load_generators_are_merged(fake_server, tmp_path, capsys):
    import ray

    url, statuses = fake_server
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        address = ray.get_runtime_context().gcs_address
        args = bs.BenchServeArgs(
            url=url,
            concurrency=[1, 5],
            requests=2,
            max_tokens=6,
            ray_address=address,
            clients_per_node=3,
            out=str(tmp_path / "ray.json"),
        )
        doc = bs.bench_serve(args)
    finally:
        ray.shutdown()
    assert doc["ray"] == {"nodes": 1, "clients_per_node": 3}
    one, five = doc["levels"]
    assert [g["streams"] for g in one["generators"]] == [1]
    assert [g["streams"] for g in five["generators"]] == [2, 2, 1]
    assert all(g.get("node_id") for g in five["generators"])
    assert len(five["samples"]) == 10
    # the merged level's numbers are those of all its samples together
    assert five["wall_s"] == max(g["end"] for g in five["generators"]) - min(
        g["start"] for g in five["generators"]
    )
    assert five["summary"] == bs.summarize(five["samples"], five["wall_s"])
    errors = Counter(x["error"] for lv in doc["levels"] for x in lv["samples"] if x["error"])
    want = {"429": statuses[429], "500": statuses[500], "stream_error": statuses["stream_error"]}
    assert errors == {k: v for k, v in want.items() if v}
    assert "clients as Ray tasks, 3 per node on 1 nodes" in capsys.readouterr().out
    assert bs.load_results(tmp_path / "ray.json")["levels"][1]["summary"] == five["summary"]

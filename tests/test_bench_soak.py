"""`bench soak` without Ray: its bad bodies, its process table, and its verdicts against a fake
server (in a thread) that gets some things wrong on purpose."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest
import uvicorn
from expertmesh.cluster.cli import bench_soak as soak
from expertmesh.cluster.config import ServeArgs
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

LIMIT = 200_000  # the fake server's body limit (the nested body is 100 kB)


def error(status: int) -> JSONResponse:
    return JSONResponse({"error": {"message": "no", "type": "x"}}, status_code=status)


def fake_app() -> FastAPI:
    """Right for good requests and most bad ones; but a 500 for wrong types, and every stream
    whose seed is a multiple of 4 stops without [DONE]."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "fake", "max_model_len": 64}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await request.body()
        if len(raw) > LIMIT:
            return error(413)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return error(400)
        if not isinstance(body.get("messages"), list) or body["model"] != "fake":
            return error(500 if isinstance(body.get("messages"), str) else 404)
        if len(body["messages"][0]["content"].split()) >= 64:
            return error(400)

        async def events():
            for _ in range(body["max_tokens"]):
                yield 'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
            usage = {"completion_tokens": body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            if body["seed"] % 4:
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
def fake_server():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(fake_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_args_have_defaults_and_descriptions():
    for name, field in soak.SoakArgs.model_fields.items():
        assert not field.is_required() and field.description, name
    with pytest.raises(ValueError, match="at most 1"):
        soak.SoakArgs(bad_rate=0.5, disconnect_rate=0.6)


def test_bad_bodies_are_bad():
    bodies = soak.bad_bodies("m", 100)
    assert set(bodies) == set(soak.EXPECTED)
    for kind in ("malformed_json", "nested_json"):
        with pytest.raises((ValueError, RecursionError)):
            json.loads(bodies[kind])
    assert len(bodies["huge_body"]) > ServeArgs().max_body_bytes
    prompt = json.loads(bodies["too_long_prompt"])["messages"][0]["content"]
    assert len(prompt.split()) >= 100
    assert isinstance(json.loads(bodies["wrong_types"])["messages"], str)


def test_rss_by_kind_sees_the_process_tree():
    child = subprocess.Popen(["sleep", "30"])
    try:
        kinds = soak.rss_by_kind(os.getpid())
        assert kinds["sleep"]["n"] == 1 and kinds["sleep"]["mb"] > 0
        assert any(k.startswith("python") or k.endswith(".py") or "pytest" in k for k in kinds)
    finally:
        child.kill()
        child.wait()


def test_verdicts_against_a_fake_server(fake_server, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(soak, "HUGE_BYTES", 2 * LIMIT)
    args = soak.SoakArgs(url=fake_server, minutes=0.04, streams=4, interval_s=1, max_tokens=8)
    res = soak.bench_soak(args.model_copy(update={"out": str(tmp_path / "soak.json")}))
    out = capsys.readouterr().out
    outcome = res["outcome"]
    assert outcome["ok"] > 0 and outcome["dropped"] > 0 and outcome["refused"] > 0
    assert outcome["FAIL:truncated"] > 0  # the streams without [DONE]
    assert res["status"].get("bad:wrong_types 500", 0) == outcome.get("FAIL:status", 0)
    for kind in ("huge_body", "unknown_model", "nested_json", "too_long_prompt"):
        assert set(k for k in res["status"] if k.startswith(f"bad:{kind} ")) <= {
            f"bad:{kind} {soak.EXPECTED[kind]}"
        }
    assert len(res["rows"]) == 3 and all(r["tok_s"] > 0 for r in res["rows"])
    assert "| t s | tok/s |" in out and "unexpected:" in out and "rss_mb" not in out
    assert json.loads((tmp_path / "soak.json").read_text())["outcome"] == dict(outcome)

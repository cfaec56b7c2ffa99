"""`expertmesh chat` (cluster/chat.py) against a small fake OpenAI-compatible server.

The server streams chat.completion.chunk SSE events the way OpenAI does and records every
request, so the tests see what the client sent (history, system prompt, key) and what it printed.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from expertmesh.cluster.cli.args import add_args, parse
from expertmesh.cluster.cli.chat import ChatArgs, api_base, run_chat
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

KEY = "sk-test"
MODEL = "fake-ernie"


def openai_error(status: int, message: str, kind: str, code: str | None = None):
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def reply_text(messages: list[dict]) -> str:
    """Depends on the whole conversation: the turn number proves the history was sent."""
    turn = sum(m["role"] == "user" for m in messages)
    return f"turn {turn}: you said {messages[-1]['content']}"


def sse_chunks(text: str, *, fail_after: int | None = None):
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL}

    def event(delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

    yield event({"role": "assistant", "content": ""})
    for i, word in enumerate(text.split(" ")):
        if fail_after is not None and i == fail_after:
            error = {"message": "worker 2 died", "type": "server_error", "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        yield event({"content": word if i == 0 else " " + word})
    yield event({}, "stop")
    yield "data: [DONE]\n\n"


def make_app(seen: list[dict]) -> FastAPI:
    app = FastAPI()

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {KEY}"

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return openai_error(401, "Incorrect API key provided", "invalid_request_error", "401")
        card = {"id": MODEL, "object": "model", "created": 0, "owned_by": "expertmesh"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        if not authorized(request):
            return openai_error(401, "Incorrect API key provided", "invalid_request_error", "401")
        last = body["messages"][-1]["content"]
        if last == "too long":
            return openai_error(400, "prompt is 9000 tokens,\n limit 4096", "invalid_request_error")
        fail_after = 2 if last == "die midway" else None
        chunks = sse_chunks(reply_text(body["messages"]), fail_after=fail_after)
        return StreamingResponse(chunks, media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server(request):
    """(url, requests seen) of a fake server on a free loopback port, in a thread."""
    seen: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(seen), log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def stop():
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()

    request.addfinalizer(stop)
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "fake server did not start"
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", seen


class Recorder(io.StringIO):
    """stdout that also keeps each write, to see that replies arrive piece by piece."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def chat(server, lines: list[str], **kw) -> tuple[int, str, list[dict], Recorder]:
    url, seen = server
    start = len(seen)
    out = Recorder()
    kw.setdefault("api_key", KEY)
    kw = {"model": None, "system": None, "temperature": 0.5, "max_tokens": 32, **kw}
    code = run_chat(url, stdin=io.StringIO("".join(x + "\n" for x in lines)), stdout=out, **kw)
    return code, out.getvalue(), seen[start:], out


def test_multi_turn_keeps_history_and_streams(server):
    code, text, requests, out = chat(server, ["hello", "how are you"])
    assert code == 0
    assert text.splitlines() == ["turn 1: you said hello", "turn 2: you said how are you"]
    first, second = requests
    assert first["model"] == MODEL  # picked from /v1/models
    assert first["stream"] is True
    assert first["max_tokens"] == 32 and first["temperature"] == 0.5
    assert first["messages"] == [{"role": "user", "content": "hello"}]
    assert second["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "turn 1: you said hello"},
        {"role": "user", "content": "how are you"},
    ]
    # streamed token by token: the first reply reached stdout in one write per word
    assert out.writes[:4] == ["turn", " 1:", " you", " said"]


def test_system_prompt_first_and_reset(server):
    lines = ["one", "two", "/reset", "three"]
    code, text, requests, _ = chat(server, lines, system="Answer briefly.", model=MODEL)
    assert code == 0
    assert "(history cleared)" in text
    system = {"role": "system", "content": "Answer briefly."}
    assert [r["messages"][0] for r in requests] == [system] * 3
    assert len(requests[1]["messages"]) == 4  # system, one, reply, two
    assert requests[2]["messages"] == [system, {"role": "user", "content": "three"}]
    assert text.splitlines()[-1] == "turn 1: you said three"


def test_api_error_is_one_line_and_the_loop_goes_on(server):
    code, text, requests, _ = chat(server, ["hello", "too long", "die midway", "again"])
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == "turn 1: you said hello"
    assert lines[1] == "error: 400 prompt is 9000 tokens, limit 4096"
    assert lines[2] == "turn 2:"  # the two words streamed before the error event
    assert lines[3] == "error: worker 2 died"
    assert lines[4] == "turn 2: you said again"
    # failed turns are not kept: the last request holds only the good turns
    assert [m["content"] for m in requests[-1]["messages"]] == [
        "hello",
        "turn 1: you said hello",
        "again",
    ]


def test_wrong_key(server):
    # listing the models already fails: nothing to chat with
    code, text, _, _ = chat(server, ["hello"], api_key="sk-wrong")
    assert code == 1
    assert text == "error: 401 Incorrect API key provided\n"
    # with the model given, each turn reports the 401 and the loop continues to EOF
    code, text, requests, _ = chat(server, ["hello", "again"], api_key="sk-wrong", model=MODEL)
    assert code == 0
    assert text.splitlines() == ["error: 401 Incorrect API key provided"] * 2
    assert len(requests) == 2


def test_exit_command_and_eof(server):
    code, text, requests, _ = chat(server, ["", "hi", "/exit", "not sent"])
    assert code == 0
    assert len(requests) == 1 and text.splitlines() == ["turn 1: you said hi"]
    code, text, requests, _ = chat(server, [])
    assert (code, text, requests) == (0, "", [])


def test_no_server_says_how_to_start_one():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = io.StringIO()
    code = run_chat(url, None, None, None, 0.7, 16, stdin=io.StringIO("hi\n"), stdout=out)
    assert code == 1
    assert out.getvalue().startswith(f"error: cannot reach {url}")
    assert "expertmesh serve" in out.getvalue() and out.getvalue().count("\n") == 1
    out = io.StringIO()
    code = run_chat(url, None, MODEL, None, 0.7, 16, stdin=io.StringIO("a\nb\n"), stdout=out)
    assert code == 0 and out.getvalue().count("cannot reach") == 2


def test_chat_args_as_cli_flags(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    parser = argparse.ArgumentParser()
    add_args(parser, ChatArgs)
    a = parse(parser, ChatArgs, parser.parse_args([]))
    assert a == ChatArgs(url="http://127.0.0.1:8000", api_key="sk-env", model=None)
    assert (a.temperature, a.max_tokens, a.system) == (0.7, 256, None)
    flags = ["--url", "http://h:9", "--api-key", "k", "--model", "m", "--system", "s"]
    a = parse(parser, ChatArgs, parser.parse_args(flags + ["--max-tokens", "8"]))
    assert (a.url, a.api_key, a.model, a.system, a.max_tokens) == ("http://h:9", "k", "m", "s", 8)
    monkeypatch.delenv("OPENAI_API_KEY")
    assert ChatArgs().api_key is None
    assert set(ChatArgs.model_fields) <= set(run_chat.__code__.co_varnames)
    assert all(f.description for f in ChatArgs.model_fields.values())


def test_api_base():
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/") == "http://h:8000/v1"


def test_chat_command_prints_no_http_log_lines(server):
    """`expertmesh chat` as a user runs it: the conversation only, no httpx/openai INFO lines
    ("HTTP Request: POST ...") on stdout or stderr."""
    url, _ = server
    r = subprocess.run(
        [sys.executable, "-m", "expertmesh.cluster.cli", "chat", "--url", url, "--api-key", KEY],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "turn 1: you said hello\n"
    assert "HTTP Request:" not in r.stdout + r.stderr
    assert " INFO " not in r.stderr  # the client logs warnings only

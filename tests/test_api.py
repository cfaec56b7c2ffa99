"""The OpenAI-compatible endpoint, through `expertmesh serve` and the official `openai` client."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import CONFIGS, reference_model
from expertmesh.ernie.tokenizer import chat_prompt_ids, load_tokenizer
from serving import Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
KEY = "sk-test"
CONTEXT = 256


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint(**CONFIGS["top2of8-shared1"])


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    s = Server(
        "--model",
        str(ckpt),
        "--workers",
        "2",
        "--transport",
        "grpc",
        "--api-key",
        KEY,
        "--max-model-len",
        str(CONTEXT),
        log_path=tmp_path_factory.mktemp("log") / "serve.log",
    )
    yield s
    assert s.stop() == set(), "processes left behind after SIGTERM"


@pytest.fixture(scope="module")
def client(server, ckpt):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def reference_chat(ckpt, messages, n):
    tok = load_tokenizer(ckpt)
    ids = chat_prompt_ids(tok, messages)
    with torch.no_grad():
        out = reference_model(ckpt).generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    new = out[0, len(ids) :].tolist()
    return tok.decode(new, skip_special_tokens=True), new


def chat(client, ckpt, messages, **kw):
    return client.chat.completions.create(model=str(ckpt), messages=messages, **kw)


MSGS = [{"role": "user", "content": "Tell me about experts."}]


def test_models_and_health(server, client, ckpt):
    assert [m.id for m in client.models.list().data] == [str(ckpt)]
    assert client.models.retrieve(str(ckpt)).id == str(ckpt)  # a path: slashes in the URL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
    assert server.get("/health").status_code == 200  # no key needed


def test_chat_greedy_equals_transformers(client, ckpt):
    text, ids = reference_chat(ckpt, MSGS, 24)
    r = chat(client, ckpt, MSGS, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("length" if len(ids) == 24 else "stop")
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.prompt_tokens == len(chat_prompt_ids(load_tokenizer(ckpt), MSGS))


def test_chat_streaming_matches_and_reports_usage(client, ckpt):
    text, ids = reference_chat(ckpt, MSGS, 24)
    chunks = list(
        chat(
            client,
            ckpt,
            MSGS,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert len(finishes) == 1
    assert chunks[-1].usage.completion_tokens == len(ids) and not chunks[-1].choices


def test_multi_turn_uses_the_chat_template(client, ckpt):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "now?"}],
        },
    ]
    text, _ = reference_chat(ckpt, messages, 16)
    assert (
        chat(client, ckpt, messages, max_tokens=16, temperature=0).choices[0].message.content
        == text
    )


def test_stop_sequences_cut_the_output(client, ckpt):
    full = chat(client, ckpt, MSGS, max_tokens=32, temperature=0).choices[0].message.content
    stop = full[5:8]
    assert stop and stop in full
    r = chat(client, ckpt, MSGS, max_tokens=32, temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = chat(client, ckpt, MSGS, max_tokens=32, temperature=0, stop=stop, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == full[: full.index(stop)]
    )


def test_n_and_seeded_sampling(client, ckpt):
    kw = dict(max_tokens=16, temperature=1.0, seed=1234, n=2)
    a, b = chat(client, ckpt, MSGS, **kw), chat(client, ckpt, MSGS, **kw)
    texts = [c.message.content for c in a.choices]
    assert len(texts) == 2 and texts == [c.message.content for c in b.choices]
    assert texts[0] != texts[1]
    other = chat(client, ckpt, MSGS, **{**kw, "seed": 99})
    assert [c.message.content for c in other.choices] != texts


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"enum": [7, 42]}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema(client, ckpt, stream):
    """The answer of a random model, in the schema's shape (properties in its order), for
    every one of n seeded choices; streamed chunks add up to the same text."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    kw = dict(max_tokens=48, temperature=1.0, seed=5, n=3, response_format=fmt)
    if stream:
        chunks = [c for c in chat(client, ckpt, MSGS, stream=True, **kw) if c.choices]
        texts = ["".join(c.choices[0].delta.content or "" for c in chunks
                         if c.choices[0].index == i) for i in range(3)]  # fmt: skip
    else:
        texts = [c.message.content for c in chat(client, ckpt, MSGS, **kw).choices]
    for text in texts:
        value = json.loads(text)
        assert list(value) == ["name", "age"] and value["age"] in (7, 42), text
        assert isinstance(value["name"], str) and len(value["name"]) <= 6
    fmt = {"type": "json_object"}
    r = chat(client, ckpt, MSGS, max_tokens=64, temperature=0, response_format=fmt)
    assert r.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError) as e:
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
        chat(client, ckpt, MSGS, max_tokens=4, response_format=bad)
    assert e.value.body["param"] == "response_format"


def test_logprobs(client, ckpt):
    _, ids = reference_chat(ckpt, MSGS, 8)
    r = chat(client, ckpt, MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    tok = load_tokenizer(ckpt)
    prompt = chat_prompt_ids(tok, MSGS)
    with torch.no_grad():
        logits = reference_model(ckpt)(torch.tensor([prompt + ids])).logits[0]
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1 :]
    visible = list(range(len(ids)))  # every counted token has its entry, EOS included
    assert len(entries) == len(visible)
    for e, i in zip(entries, visible):
        assert abs(e.logprob - float(logp[i, ids[i]])) < 1e-3
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6


def test_completions_with_token_ids(client, ckpt):
    tok = load_tokenizer(ckpt)
    prompts = [[5, 17, 99, 3], [40, 41]]
    r = client.completions.create(
        model=str(ckpt), prompt=prompts, max_tokens=6, temperature=0, logprobs=2
    )
    assert len(r.choices) == 2
    for p, choice in zip(prompts, sorted(r.choices, key=lambda c: c.index)):
        with torch.no_grad():
            out = reference_model(ckpt).generate(
                torch.tensor([p]), max_new_tokens=6, do_sample=False
            )
        assert choice.text == tok.decode(out[0, len(p) :].tolist(), skip_special_tokens=True)
        assert len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens)
    single = client.completions.create(
        model=str(ckpt), prompt=prompts[0], max_tokens=6, temperature=0
    )
    assert single.choices[0].text == sorted(r.choices, key=lambda c: c.index)[0].text


def test_routed_experts_and_active_params(server, ckpt):
    body = {
        "model": str(ckpt),
        "messages": MSGS,
        "max_tokens": 4,
        "temperature": 0,
        "return_routed_experts": True,
    }
    r = server.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ).json()
    experts = r["choices"][0]["routed_experts"]
    assert experts and all(
        len(layer) == 2 and all(0 <= e < 8 for e in layer) for tok in experts for layer in tok
    )
    assert 0 < r["usage"]["active_params_per_token"]
    assert r["usage"]["flops"]["spent"] < r["usage"]["flops"]["dense_equivalent"]


BAD = [
    ("malformed json", b"{not json", 400, None),
    ("wrong type", {"messages": "hi", "max_tokens": 4}, 400, "messages"),
    ("negative temperature", {"messages": MSGS, "temperature": -1}, 400, "temperature"),
    ("max_tokens 0", {"messages": MSGS, "max_tokens": 0}, 400, "max_tokens"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("too long", {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests(server, client, ckpt, name, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if isinstance(body, dict):
        body = json.dumps({"model": str(ckpt), **body}).encode()
    r = server.post("/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] and err["param"].startswith(param)
    assert chat(client, ckpt, MSGS, max_tokens=2).choices  # still serving


def test_token_ids_outside_the_vocabulary(server, client, ckpt):
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model=str(ckpt), prompt=[5, 10**6], max_tokens=2)
    assert client.completions.create(model=str(ckpt), prompt=[5, 6], max_tokens=2).choices


def test_auth_and_unknown_model_and_path(server, ckpt):
    body = {"model": str(ckpt), "messages": MSGS, "max_tokens": 2}
    assert server.post("/v1/chat/completions", json=body).status_code == 401
    r = server.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert server.get("/metrics").status_code == 401
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).chat.completions.create(
            model="no-such-model", messages=MSGS
        )
    r = server.get("/v1/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


def running(server) -> float:
    text = server.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(r"^expertmesh_requests_running (\S+)$", text, re.M).group(1))


def test_dropped_stream_frees_its_slot(server, client, ckpt):
    stream = chat(client, ckpt, MSGS, max_tokens=200, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while running(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(server) == 0
    text = server.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "expertmesh_time_to_first_token_seconds_bucket" in text
    assert re.search(
        r'expertmesh_expert_routed_tokens_total\{expert="\d",layer="\d",modality="text"\} [1-9]',
        text,
    )


def test_32_concurrent_streaming_clients(client, ckpt):
    prompts = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(32)]
    want = [reference_chat(ckpt, m, 12)[0] for m in prompts]
    got: list[str | None] = [None] * 32

    def run(i):
        s = chat(client, ckpt, prompts[i], max_tokens=12, temperature=0, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == want


def _hold_stream(s: Server, ckpt, started: threading.Event, release: threading.Event):
    """A long streaming request that stays open until `release`."""
    body = {
        "model": str(ckpt),
        "messages": MSGS,
        "max_tokens": 3000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=120) as r:
        for _ in r.iter_lines():
            started.set()
            if release.is_set():
                return


def test_queue_full_and_workers_down(ckpt, tmp_path):
    s = Server(
        "--model",
        str(ckpt),
        "--workers",
        "2",
        "--max-num-seqs",
        "1",
        "--max-waiting",
        "1",
        "--max-worker-restarts",
        "0",
        "--restart-timeout-s",
        "3",
        log_path=tmp_path / "serve.log",
    )
    release = threading.Event()
    try:
        started = [threading.Event(), threading.Event()]
        threads = [
            threading.Thread(target=_hold_stream, args=(s, ckpt, e, release)) for e in started
        ]
        threads[0].start()
        assert started[0].wait(60)  # running: the batch holds one sequence
        threads[1].start()
        time.sleep(1.0)  # the second one waits in the queue
        r = s.post("/v1/chat/completions", json={"model": str(ckpt), "messages": MSGS})
        assert r.status_code == 429 and r.headers.get("retry-after")
        assert r.json()["error"]["type"] == "rate_limit_error"
        release.set()
        for t in threads:
            t.join(120)
        # a non-streaming client that gives up frees the one slot: the next request runs now
        # (were the dropped one left running, 3000 tokens would hold the slot for ~45 s)
        long = {"model": str(ckpt), "messages": MSGS, "max_tokens": 3000, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/chat/completions", json=long, timeout=1.0)
        short = {"model": str(ckpt), "messages": MSGS, "max_tokens": 4}
        assert httpx.post(s.url + "/v1/chat/completions", json=short, timeout=20).status_code == 200
        pid = max(_worker_pids(s))
        os.kill(pid, signal.SIGKILL)
        body = {"model": str(ckpt), "messages": MSGS, "max_tokens": 2}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the gateway notices within its probe interval
            health, r = s.get("/health"), s.post("/v1/chat/completions", json=body)
            if health.status_code == 503 and r.status_code == 503:
                break
            time.sleep(0.5)
        assert health.status_code == 503, health.text
        assert r.status_code == 503 and r.json()["error"]["message"], r.text
    finally:
        release.set()
        assert s.stop() == set()


def _worker_pids(s: Server) -> list[int]:
    from serving import descendants

    out = []
    for p in descendants(s.proc.pid):
        try:
            if open(f"/proc/{p}/cmdline").read().startswith("ray::ExpertWorker"):
                out.append(p)
        except OSError:
            pass
    return out

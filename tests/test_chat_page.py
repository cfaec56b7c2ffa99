"""The chat page at `/`, driven in headless Chromium (Playwright) against a real `expertmesh serve`.

One server with an API key: the page must find out that it needs one, take the right one and
show the server's 401 for a wrong one. Answers are compared with the API's own (greedy) answers
through the official `openai` client. Chromium is Debian's (`apt-get install chromium`), never a
download. Set EXPERTMESH_SCREENSHOT=docs/chat-page.png to refresh the README's screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
from serving import Server

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # a developer machine without the dev extra: see _need
    expect = sync_playwright = None

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CHROMIUM = "/usr/bin/chromium"
KEY = "sk-page"
ANSWER_TIMEOUT_MS = 120_000  # two shared cores and a benchmark beside us
# a checkpoint with enough MoE layers and experts for a heatmap worth looking at
CKPT = dict(experts=16, top_k=2, shared=1, layers=6, seed=5)
LONG_PROMPT = "Tell me a story."  # greedy: a few hundred tokens before its EOS

if expect is not None:
    expect.set_options(timeout=ANSWER_TIMEOUT_MS)


def _need(ok: bool, reason: str) -> None:
    """Skip on a developer machine without Chromium; in CI a missing browser is a failure."""
    if ok:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI is set: the page tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    _need(sync_playwright is not None, "playwright is not installed: pip install -e '.[dev]'")
    _need(
        os.path.exists(CHROMIUM),
        f"{CHROMIUM} is missing: apt-get install -y chromium (the README's test command does)",
    )
    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM)
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint(**CKPT)


@pytest.fixture(scope="module")
def server(browser, ckpt, tmp_path_factory):
    s = Server(
        "--model",
        str(ckpt),
        "--workers",
        "2",
        "--api-key",
        KEY,
        "--max-model-len",
        "1024",
        "--served-model-name",
        "ernie-tiny",
        log_path=tmp_path_factory.mktemp("log") / "serve.log",
    )
    yield s
    assert s.stop() == set(), "processes left behind after SIGTERM"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _open(browser, server, width=1200, height=800):
    """A fresh tab (its own sessionStorage) on the page; records what it fetches and its errors."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda r: page.requests.append(r))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(server.url + "/")
    return context, page


def _check_clean(page, server) -> None:
    """Nothing fetched from anywhere but this server (works offline) and no script errors."""
    outside = [
        r.url for r in page.requests if not r.url.startswith((server.url + "/", "data:", "blob:"))
    ]
    assert outside == [] and page.errors == []


def _enter_key(page, key: str) -> None:
    expect(page.locator("#key-row")).to_be_visible()  # /v1/models said 401 without a key
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")


@pytest.fixture
def page(browser, server):
    context, page = _open(browser, server)
    _enter_key(page, KEY)
    expect(page.locator("#model-info")).to_contain_text("16 experts, top-2, 5 MoE layers")
    expect(page.locator("#status")).to_be_hidden()
    yield page
    _check_clean(page, server)
    context.close()


def settings(page, **fields) -> None:
    """Fill Settings fields: system, temperature, top_p, max_tokens, seed."""
    if not page.locator("#settings").evaluate("d => d.open"):
        page.click("#settings summary")
    for name, value in fields.items():
        page.fill("#" + name.replace("_", "-"), str(value))


def answers(page):
    return page.locator(".msg.assistant")


def ask(page, text: str, state: str | None = "done"):
    """Type `text` and press Enter; the answer's element, once in `state` (None: at once)."""
    n = answers(page).count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    answer = answers(page).nth(n)
    if state is not None:
        expect(answer).to_have_attribute("data-state", state)
    return answer


def text_of(answer) -> str:
    return answer.locator(".content").text_content()


def chat_bodies(page) -> list[dict]:
    return [
        r.post_data_json
        for r in page.requests
        if r.method == "POST" and r.url.endswith("/v1/chat/completions")
    ]


def api_answer(client, messages, **kw):
    return client.chat.completions.create(model="", messages=messages, temperature=0, **kw).choices[
        0
    ]


def running(server) -> float:
    text = server.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(r"^expertmesh_requests_running (\S+)$", text, re.M).group(1))


# -- the tests --------------------------------------------------------------------------------


def test_page_is_served_without_a_key_and_finds_the_model_card(server, browser):
    r = httpx.get(server.url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        r = httpx.get(f"{server.url}/static/{name}", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    assert httpx.get(server.url + "/static/..%2Fingress.py", timeout=30).status_code == 404
    card = server.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]
    assert card["capabilities"] == {"vision": False, "routed_experts": True, "chat": True}
    assert (card["num_experts"], card["top_k"], card["moe_layers"]) == (16, 2, [1, 2, 3, 4, 5])

    context, page = _open(browser, server)
    expect(page.locator("#status")).to_contain_text("needs an API key")
    expect(page.locator("#key-row")).to_be_visible()
    expect(page.locator("#attach-row")).to_be_hidden()  # a text-only model: nothing to attach
    _check_clean(page, server)
    context.close()


def test_streamed_answer_equals_the_api_greedy_answer(page, client):
    settings(page, temperature=0, max_tokens=24)
    answer = ask(page, "Tell me about experts.")
    want = api_answer(
        client, [{"role": "user", "content": "Tell me about experts."}], max_tokens=24
    )
    assert text_of(answer) == want.message.content
    meta = answer.locator(".meta").text_content()
    assert re.search(r"\d+ tokens · first token \d+ ms", meta), meta
    (body,) = chat_bodies(page)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["max_tokens"] == 24
    assert "return_routed_experts" not in body  # plain chat carries no routing payload
    assert answer.locator(".experts").count() == 0


def test_multi_turn_with_system_prompt_and_new_chat(page, client):
    system = {"role": "system", "content": "You are terse."}
    settings(page, system="You are terse.", temperature=0, max_tokens=16)
    # keyboard only: Shift+Enter is a new line inside the message, Enter sends
    page.focus("#input")
    page.keyboard.type("Hi there")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    page.keyboard.press("Enter")
    first = answers(page).nth(0)
    expect(first).to_have_attribute("data-state", "done")
    q1 = {"role": "user", "content": "Hi there\nsecond line"}
    a1 = api_answer(client, [system, q1], max_tokens=16).message.content
    assert text_of(first) == a1

    second = ask(page, "And now?")
    q2 = {"role": "user", "content": "And now?"}
    a2 = api_answer(client, [system, q1, {"role": "assistant", "content": a1}, q2], max_tokens=16)
    assert text_of(second) == a2.message.content
    assert chat_bodies(page)[1]["messages"] == [
        system,
        q1,
        {"role": "assistant", "content": a1},
        q2,
    ]

    page.click("#new-chat")  # a new conversation: only the new turn is sent
    assert answers(page).count() == 0
    fresh = ask(page, "And now?")
    assert text_of(fresh) == api_answer(client, [system, q2], max_tokens=16).message.content


def test_stop_mid_stream_frees_the_slot(page, server):
    settings(page, temperature=0, max_tokens=900)
    for how in ("Escape", "button"):
        answer = ask(page, LONG_PROMPT, state="streaming")
        expect(answer.locator(".content")).to_have_text(re.compile(r"\S{4}"))  # it streams
        assert running(server) == 1
        if how == "Escape":
            page.keyboard.press("Escape")
        else:
            page.click("#stop")
        expect(answer).to_have_attribute("data-state", "stopped")
        assert "stopped" in answer.locator(".meta").text_content()
        deadline = time.monotonic() + 20
        while running(server) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running(server) == 0, f"stopped with {how}: the engine request is still running"
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.locator("#input")).to_be_focused()  # ready for the next message
    kept = chat_bodies(page)[1]["messages"]  # the stopped answer's text stays in the chat
    assert [m["role"] for m in kept] == ["user", "assistant", "user"] and kept[1]["content"]


def test_wrong_key_shows_the_401_message_then_the_right_key_works(browser, server, client):
    context, page = _open(browser, server)
    _enter_key(page, "sk-wrong")
    expect(page.locator("#status")).to_have_text("Error 401: missing or invalid API key")
    answer = ask(page, "Hello?", state="error")
    expect(answer.locator(".error")).to_have_text("Error 401: missing or invalid API key")
    # the turn was not sent: it leaves the conversation and its text returns to the box
    expect(page.locator(".msg.user.unsent")).to_have_count(1)
    expect(page.locator("#input")).to_have_value("Hello?")

    _enter_key(page, KEY)
    expect(page.locator("#status")).to_be_hidden()
    settings(page, temperature=0, max_tokens=8)
    page.press("#input", "Enter")
    ok = answers(page).nth(1)
    expect(ok).to_have_attribute("data-state", "done")
    want = api_answer(client, [{"role": "user", "content": "Hello?"}], max_tokens=8)
    assert text_of(ok) == want.message.content
    assert [m["role"] for m in chat_bodies(page)[-1]["messages"]] == ["user"]
    _check_clean(page, server)
    context.close()


def _api_routing(server, prompt: str, max_tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_routed_experts": True,
    }
    r = server.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    return r.json()


def test_experts_view_counts_equal_return_routed_experts(page, server):
    settings(page, temperature=0, max_tokens=16)
    page.check("#show-experts")
    answer = ask(page, "What are experts?")
    api = _api_routing(server, "What are experts?", 16)
    choice, usage = api["choices"][0], api["usage"]
    assert text_of(answer) == choice["message"]["content"]
    routed = choice["routed_experts"]  # [tokens][moe layers][k]
    want = Counter((layer, e) for tok in routed for layer, ids in enumerate(tok) for e in ids)

    cells = answer.locator(".heatmap td").evaluate_all(
        "tds => tds.map(td => [+td.dataset.moe, +td.dataset.expert, +td.dataset.count])"
    )
    assert len(cells) == 5 * 16  # every (MoE layer, expert), zeros included
    assert {(m, e): n for m, e, n in cells if n} == dict(want)
    assert sum(n for *_, n in cells) == len(routed) * 5 * 2

    stats = answer.locator(".experts .stats")
    assert int(stats.get_attribute("data-active-params")) == usage["active_params_per_token"]
    assert int(stats.get_attribute("data-flops-spent")) == usage["flops"]["spent"]
    assert int(stats.get_attribute("data-flops-dense")) == usage["flops"]["dense_equivalent"]
    assert "FLOPs spent" in stats.text_content()
    assert chat_bodies(page)[0]["return_routed_experts"] is True

    def shown() -> list[tuple[int, int, str]]:
        return answer.locator(".inspector dd").evaluate_all(
            "dds => dds.map(dd => [+dd.dataset.token, +dd.dataset.moe, dd.textContent])"
        )

    def want_shown(span) -> list[tuple[int, int, str]]:
        first, count = int(span.get_attribute("data-first")), int(span.get_attribute("data-count"))
        return [
            [t, layer, ", ".join(map(str, ids))]
            for t in range(first, first + count)
            for layer, ids in enumerate(routed[t])
        ]

    tokens = answer.locator(".tok")
    tokens.nth(0).hover()  # hovering a token shows its experts in every MoE layer
    assert shown() == want_shown(tokens.nth(0))
    hits = answer.locator(".heatmap td.hit").evaluate_all(
        "tds => tds.map(td => [+td.dataset.moe, +td.dataset.expert])"
    )
    assert sorted(map(tuple, hits)) == sorted(
        {(layer, e) for layer, ids in enumerate(routed[0]) for e in ids}
    )
    tokens.nth(0).focus()  # and from the keyboard: the arrow keys walk the tokens
    page.keyboard.press("ArrowRight")
    expect(tokens.nth(1)).to_be_focused()
    assert shown() == want_shown(tokens.nth(1))
    page.keyboard.press("End")
    expect(tokens.last).to_be_focused()
    assert shown() == want_shown(tokens.last)


PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def _sse(*events) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_vision_models_get_an_attach_control(page, server):
    """No model here takes images yet: the card and the answer are stood in for."""
    card = server.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    card["data"][0]["capabilities"]["vision"] = True
    page.route("**/v1/models", lambda route: route.fulfill(json=card))
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}}]}
    reply = _sse(
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**chunk, "choices": [{"index": 0, "delta": {"content": "a dot"}}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    )
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(body=reply, content_type="text/event-stream"),
    )
    page.reload()  # the key stays: sessionStorage belongs to the tab
    expect(page.locator("#attach-row")).to_be_visible()
    page.set_input_files("#attach", {"name": "dot.png", "mimeType": "image/png", "buffer": PNG})
    expect(page.locator("#attachments img")).to_have_count(1)
    answer = ask(page, "What is this?")
    assert text_of(answer) == "a dot"
    expect(page.locator(".msg.user img")).to_have_count(1)
    expect(page.locator("#attachments img")).to_have_count(0)
    content = chat_bodies(page)[-1]["messages"][-1]["content"]
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert content == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]


ERRORS = [
    (
        429,
        {"Retry-After": "2", "retry-after-ms": "1500"},
        "rate limit reached for requests: 60 per minute for this API key; retry in 1.50s",
        " (retry after 1.5 s)",
    ),
    (
        503,
        {"Retry-After": "1", "retry-after-ms": "1000"},
        "not ready: workers down",
        " (retry after 1 s)",
    ),
]


@pytest.mark.parametrize("status,headers,message,retry", ERRORS, ids=["429", "503"])
def test_errors_are_shown_as_the_server_words_them(page, status, headers, message, retry):
    body = {"error": {"message": message, "type": "x", "param": None, "code": None}}
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=status, headers=headers, json=body),
    )
    answer = ask(page, "Hello?", state="error")
    expect(answer.locator(".error")).to_have_text(f"Error {status}: {message}{retry}")


def test_an_error_event_mid_stream_is_shown(page):
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "So"}}],
    }
    error = {"error": {"message": "the server is shutting down", "type": "service_unavailable"}}
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(body=_sse(chunk, error), content_type="text/event-stream"),
    )
    answer = ask(page, "Hello?", state="error")
    assert text_of(answer) == "So"
    expect(answer.locator(".error")).to_have_text("Error: the server is shutting down")


def test_readable_at_400px_and_every_control_is_labelled(page):
    settings(page, temperature=0, max_tokens=24)
    page.check("#show-experts")
    ask(page, "What are experts?")
    page.set_viewport_size({"width": 400, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth") <= 400  # no sideways page
    for selector in ("#input", "#send", "#show-experts", "#new-chat"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 400, selector
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, textarea, button, select')]
            .filter(c => !(c.labels?.length || c.getAttribute('aria-label') || c.textContent.trim()))
            .map(c => c.id || c.outerHTML)"""
    )
    assert unlabelled == []


def test_screenshot(page, tmp_path):
    """The README's picture: one plain answer, then one with its experts (a token focused)."""
    settings(page, temperature=0, max_tokens=12)
    ask(page, "Hi")
    settings(page, max_tokens=48)
    page.click("#settings summary")  # closed again
    page.check("#show-experts")
    answer = ask(page, "What are experts?")
    answer.locator(".tok").nth(3).focus()
    page.evaluate("document.getElementById('log').scrollTop = 1e9")  # the whole experts view
    path = tmp_path / "chat-page.png"
    page.screenshot(path=path)
    assert path.stat().st_size > 10_000
    if target := os.environ.get("EXPERTMESH_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)

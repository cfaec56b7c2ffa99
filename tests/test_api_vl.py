"""Images in chat, through `expertmesh serve` on a tiny ERNIE-4.5-VL and the official client.

Greedy answers equal the in-process engine's on the same images (whose parity with
transformers is tests/test_vl_parity.py's); usage counts image tokens; each bad image gets
its 400; a text request to the VL model is the text path; /metrics counts vision experts.
"""

from __future__ import annotations

import base64
import io
import re

import httpx
import openai
import pytest
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.image import ImageSettings, preprocess
from expertmesh.ernie.tokenizer import chat_prompt_ids, load_tokenizer
from expertmesh.router.engine import LLMEngine
from expertmesh.router.sampling import SamplingParams
from PIL import Image
from serving import Server
from vl_reference import image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(vl_checkpoint, tmp_path_factory):
    s = Server(
        *("--model", str(vl_checkpoint), "--workers", "2", "--transport", "grpc"),
        *("--max-images-per-request", "3", "--max-image-bytes", "60000"),
        *("--max-image-pixels", str(400 * 400)),
        log_path=tmp_path_factory.mktemp("log") / "serve.log",
    )
    yield s
    assert s.stop() == set(), "processes left behind after SIGTERM"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def engine(vl_checkpoint):
    return LLMEngine.from_checkpoint(vl_checkpoint, num_shards=2)


def png(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def local_greedy(ckpt, engine, messages: list[dict], images: list, n: int) -> tuple[list, int]:
    """The in-process engine's greedy tokens for the same conversation, and its prompt length."""
    template = [
        {
            "role": m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]],
        }
        for m in messages
    ]
    ids = chat_prompt_ids(load_tokenizer(ckpt), template)
    params = SamplingParams(max_tokens=n, temperature=0)
    out = engine.generate([ids], params, images=[images or None])[0]
    settings = ImageSettings.from_dir(ckpt)
    extra = 0
    if images:
        counts = preprocess(images, settings).tokens_per_image(settings.merge_size)
        extra = sum(counts) - len(counts)
    return out.token_ids, len(ids) + extra


def ask(client, ckpt, messages, **kw):
    return client.chat.completions.create(
        model=str(ckpt), messages=messages, temperature=0, max_tokens=12, **kw
    )


def test_the_card_says_the_model_takes_images(client):
    card = client.models.list().data[0]
    assert card.capabilities["vision"] is True


@pytest.mark.parametrize(
    "case",
    ["one-image", "two-images-of-different-sizes", "image-in-the-second-turn", "jpeg-and-webp"],
)
def test_greedy_answers_with_images_equal_the_engine(client, engine, vl_checkpoint, case):
    a, b = image(50, 90, 1), image(130, 60, 3)
    if case == "one-image":
        msgs, imgs = [{"role": "user", "content": [part(png(a)), text("What is this?")]}], [a]
    elif case == "two-images-of-different-sizes":
        content = [text("Compare"), part(png(a)), text(" and "), part(png(b))]
        msgs, imgs = [{"role": "user", "content": content}], [a, b]
    elif case == "image-in-the-second-turn":
        msgs = [
            {"role": "user", "content": "Hi, can you see images?"},
            {"role": "assistant", "content": "Yes, show me one."},
            {"role": "user", "content": [text("Here:"), part(png(b)), text(" what is it?")]},
        ]
        imgs = [b]
    else:  # lossy formats: compare on the decoded pixels the server sees
        jpeg, webp = png(a, "JPEG"), png(b, "WEBP")
        decoded = [
            Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB")
            for u in (jpeg, webp)
        ]
        msgs = [{"role": "user", "content": [part(jpeg), part(webp), text("Two pictures.")]}]
        imgs = decoded
    want, prompt_tokens = local_greedy(vl_checkpoint, engine, msgs, imgs, 12)
    r = ask(client, vl_checkpoint, msgs, stream=False)
    tok = load_tokenizer(vl_checkpoint)
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(want)
    assert r.usage.prompt_tokens == prompt_tokens  # image tokens counted
    streamed = ask(client, vl_checkpoint, msgs, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        r.choices[0].message.content
    )


def test_a_text_request_to_the_vl_model_is_the_text_path(client, engine, vl_checkpoint):
    msgs = [{"role": "user", "content": "Hello there, what is the capital of France?"}]
    want, prompt_tokens = local_greedy(vl_checkpoint, engine, msgs, [], 12)
    r = ask(client, vl_checkpoint, msgs)
    assert r.choices[0].message.content == load_tokenizer(vl_checkpoint).decode(
        want, skip_special_tokens=True
    )
    assert r.usage.prompt_tokens == prompt_tokens


BAD = {
    "corrupt": (
        lambda: "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"x" * 50).decode(),
        "decoded",
    ),
    "truncated": (lambda: png(image(60, 60, 5))[:200], "base64"),
    "gif": (lambda: png_any(image(20, 20, 6), "GIF", "image/gif"), "image/gif"),
    "too-many-bytes": (lambda: png(image(200, 200, 7)), "bytes"),
    "too-many-pixels": (lambda: png(Image.new("RGB", (500, 500))), "500x500"),
    "remote-url": (lambda: "https://127.0.0.1:9/cat.png", "data:image"),
    "not-a-url": (lambda: "file:///etc/passwd", "data: URL"),
}


def png_any(img, fmt, mime) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("name", BAD)
def test_each_bad_image_gets_its_400(server, vl_checkpoint, name):
    url, words = BAD[name]
    content = [text("look"), part(url())]
    body = {"model": str(vl_checkpoint), "messages": [{"role": "user", "content": content}]}
    r = server.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "messages.0.content.1"
    assert err["code"] == "invalid_image" and words in err["message"], err


def test_too_many_images_and_a_part_without_url(server, vl_checkpoint):
    tiny = png(image(20, 20, 8))
    content = [part(tiny) for _ in range(4)]
    body = {"model": str(vl_checkpoint), "messages": [{"role": "user", "content": content}]}
    r = server.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "at most 3" in r.json()["error"]["message"]
    body["messages"][0]["content"] = [{"type": "image_url"}]
    r = server.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


def test_metrics_count_vision_experts(server, client, vl_checkpoint):
    a = image(50, 90, 9)
    ask(client, vl_checkpoint, [{"role": "user", "content": [part(png(a)), text("?")]}])
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    cfg = ModelConfig.from_dir(vl_checkpoint)
    vision = re.findall(
        r'routed_tokens_total\{expert="(\d+)",layer="\d+",modality="vision"\} (\S+)', metrics
    )
    assert vision and all(int(e) >= cfg.num_text_experts for e, _ in vision)
    assert sum(float(n) for _, n in vision) > 0

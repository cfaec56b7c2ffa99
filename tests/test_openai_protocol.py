"""OpenAI request validation, prompt building, incremental detokenization, response shapes."""

from __future__ import annotations

import asyncio
import json
import math
import random

import httpx
import openai
import pytest
from expertmesh.cluster.api import openai_protocol as op
from expertmesh.cluster.api import openai_responses as resp
from expertmesh.cluster.api.admission import Admission
from expertmesh.cluster.api.textstream import TextStream, token_bytes, token_text
from expertmesh.cluster.config import ServeArgs
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.tokenizer import load_tokenizer
from expertmesh.router.events import ErrorKind, TokenEvent
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from safetensors import safe_open

EOS = (2, 4)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint()


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def cfg(ckpt):
    return ModelConfig.from_dir(ckpt)


def chat(**kw):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}


def chat_error(**kw) -> op.APIError:
    with pytest.raises(op.APIError) as e:
        op.parse_chat_request(chat(**kw))
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    return e.value


# -- request validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"seed": "1"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": 5}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"five": 1.0}}, "logit_bias"),
        ({"logit_bias": {"-3": 1.0}}, "logit_bias"),
        ({"logit_bias": [5, 1.0]}, "logit_bias"),
        ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 6, "max_tokens": 5}, "min_tokens"),
        ({"min_tokens": 6, "max_completion_tokens": 5}, "min_tokens"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids.1"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format.json_schema",
        ),
        ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tools": [{"type": "function"}], "tool_choice": "auto"}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text",
        ),
    ],
)
def test_chat_validation_names_the_field(kw, param):
    err = chat_error(**kw)
    assert err.param == param
    assert err.message.startswith(param)
    assert err.body()["error"]["param"] == param


def test_image_part_is_refused():
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    err = chat_error(messages=[{"role": "user", "content": parts}])
    assert err.param == "messages.0.content.1"
    assert "text only" in err.message


def test_valid_chat_request_defaults_and_extras():
    req = op.parse_chat_request(chat(unknown_field=1, temperature=None, max_tokens=5))
    assert req.temperature is None and req.n == 1 and req.stop_list == []
    assert req.requested_max_tokens == 5
    req = op.parse_chat_request(chat(max_tokens=5, max_completion_tokens=7, stop="x"))
    assert req.requested_max_tokens == 7 and req.stop_list == ["x"]
    req = op.parse_chat_request(chat(stream=True, stream_options={"include_usage": True}))
    assert req.include_usage


def test_penalties_bias_and_min_p_reach_the_engine():
    """OpenAI's penalties and logit_bias, vLLM's repetition_penalty, min_p and min_tokens: each
    choice's SamplingParams carries them (token ids as ints)."""
    req = op.parse_chat_request(
        chat(presence_penalty=0.5, frequency_penalty=-1.5, logit_bias={"5": -100, "17": 2.5},
             repetition_penalty=1.3, min_p=0.05, min_tokens=4, max_tokens=9, n=2)
    )  # fmt: skip
    for i in range(2):
        p = op.sampling_params(req, i)
        assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.5, 1.3)
        assert (p.min_p, p.min_tokens, p.max_tokens) == (0.05, 4, 9)
        assert dict(p.logit_bias) == {5: -100, 17: 2.5}
    p = op.sampling_params(op.parse_chat_request(chat()))
    assert not p.adjusts and p.min_p == 0
    # an unset max_tokens gives way to min_tokens; a set one must hold it (above)
    creq = op.parse_completion_request({"prompt": "x", "min_tokens": 40})
    assert op.sampling_params(creq).max_tokens == 40
    with pytest.raises(op.APIError) as e:
        op.check_logit_bias(op.parse_chat_request(chat(logit_bias={"3": 1, "999": 1})), 999)
    assert e.value.status == 400 and e.value.param == "logit_bias" and "[999]" in e.value.message


def test_an_unusable_json_schema_is_a_400():
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    req = op.parse_chat_request(chat(response_format=fmt))  # the shape is fine
    with pytest.raises(op.APIError) as e:
        op.check_structured(req)
    assert e.value.status == 400 and e.value.param == "response_format"
    good = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}
    op.check_structured(op.parse_chat_request(chat(response_format=good)))
    op.check_structured(op.parse_chat_request(chat(response_format={"type": "json_object"})))


def test_admission_counts_the_tokens_min_tokens_forces():
    """min_tokens raises an unset max_tokens, so the per-request token bound counts it."""
    admission = Admission(ServeArgs(max_request_tokens=100, default_max_tokens=16))
    admit = lambda **kw: asyncio.run(  # noqa: E731
        admission.admit(None, [[1] * 10], op.parse_chat_request(chat(**kw)), 4096, 0)
    )
    admit(min_tokens=80)  # 10 + 80
    with pytest.raises(op.APIError) as e:
        admit(min_tokens=95)
    assert e.value.param == "max_tokens" and "105 tokens" in e.value.message


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_every_optional_field_takes_null(endpoint, tok):
    """JSON null for any optional field is its default (clients other than OpenAI's send
    them): the request parses, is admitted and gives sampling params (`n: null` was once a
    500 in admission)."""
    cls = op.ChatCompletionRequest if endpoint == "chat" else op.CompletionRequest
    base = chat() if endpoint == "chat" else {"prompt": "x"}
    parse = op.parse_chat_request if endpoint == "chat" else op.parse_completion_request
    admission = Admission(ServeArgs())
    nullable = [
        name
        for name, f in cls.model_fields.items()
        if name not in base and f.default is not None and "None" in str(f.annotation)
    ]
    assert {"n", "temperature", "top_p", "presence_penalty"} <= set(nullable)
    for name in nullable:
        req = parse(base | {name: None})
        asyncio.run(admission.admit(None, [[1, 2]], req, 4096, 0))
        params = op.sampling_params(req)
        op.text_stream(req, tok)
        assert params.temperature == 1.0 and params.top_p == 1.0, name


def test_unsupported_fields_pass_with_their_neutral_values():
    """Fields the engine has no use for are a 400 unless they would change nothing."""
    op.parse_chat_request(chat(response_format={"type": "text"}))
    op.parse_chat_request(chat(tools=[{"type": "function"}], tool_choice="none", functions=[]))
    creq = op.parse_completion_request({"prompt": "x", "n": 2, "best_of": 2, "suffix": ""})
    assert creq.best_of == 2
    for kw, param in [({"best_of": 3, "n": 2}, "best_of"), ({"best_of": 2}, "best_of"),
                      ({"suffix": "tail"}, "suffix")]:  # fmt: skip
        with pytest.raises(op.APIError) as e:
            op.parse_completion_request({"prompt": "x", **kw})
        assert e.value.status == 400 and e.value.param == param


def test_stop_token_ids_reach_the_engine_and_end_the_text(tok):
    """vLLM's `stop_token_ids`: the engine stops on them, and like EOS they leave no text, with
    `ignore_eos` too (which only makes EOS an ordinary token)."""
    req = op.parse_completion_request({"prompt": "x", "stop_token_ids": [7, 9]})
    assert op.sampling_params(req).stop_token_ids == (7, 9)
    assert op.sampling_params(op.parse_completion_request({"prompt": "x"})).stop_token_ids == ()
    a, b = (tok.encode(c, add_special_tokens=False)[0] for c in "ab")
    for ignore_eos, stops in [(False, {b, *EOS}), (True, {b})]:
        req = op.parse_chat_request(chat(stop_token_ids=[b], ignore_eos=ignore_eos))
        s = op.text_stream(req, tok, EOS)
        assert s.stop_token_ids == stops
        for t in (a, b):
            s.push(t)
        s.finish()
        assert s.text == "a"


def test_body_not_an_object():
    with pytest.raises(op.APIError) as e:
        op.parse_chat_request([1, 2])
    assert e.value.status == 400


@pytest.mark.parametrize(
    "prompt",
    ["", [], [""], [[]], [1, "a"], [[1, 2], [3, "x"]], [1.5], [True], [[1], 2], {"a": 1}, 7, None],
)
def test_bad_prompts(prompt):
    with pytest.raises(op.APIError) as e:
        op.parse_completion_request({"model": "m", "prompt": prompt})
    assert e.value.status == 400 and e.value.param == "prompt"


def test_missing_prompt_and_completion_fields():
    with pytest.raises(op.APIError) as e:
        op.parse_completion_request({"model": "m"})
    assert e.value.param == "prompt"
    for kw, param in [
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
    ]:
        with pytest.raises(op.APIError) as e:
            op.parse_completion_request({"prompt": "x", **kw})
        assert e.value.param == param


def test_completion_prompt_forms(tok):
    def prompts(p):
        return op.completion_prompts(op.parse_completion_request({"prompt": p}), tok)

    hello = tok.encode("Hello")
    assert prompts("Hello") == [hello]
    assert prompts(["Hello", "the sea"]) == [hello, tok.encode("the sea")]
    assert prompts([5, 6, 7]) == [[5, 6, 7]]
    assert prompts([[5, 6], [7]]) == [[5, 6], [7]]
    req = op.parse_completion_request({"prompt": "x"})
    assert req.max_tokens == 16 and req.requested_max_tokens is None


# -- prompts ----------------------------------------------------------------------------------


def test_chat_prompt_ids_match_the_template(tok):
    messages = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "the sea?"}]},
        {"role": "assistant", "content": "The sea is wide."},
        {"role": "user", "content": "And deep?", "name": "bob"},
    ]  # fmt: skip
    req = op.parse_chat_request({"model": "m", "messages": messages})
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = tok.encode(text, add_special_tokens=False)
    assert op.chat_prompt_ids(req, tok) == expected
    rendered = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert op.chat_prompt_ids(req, tok) == list(rendered["input_ids"])
    assert expected[0] == 3  # <|begin_of_sentence|>


def test_developer_renders_as_system_and_trailing_assistant(tok):
    dev = op.parse_chat_request(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "x"},
            ]
        }
    )
    sys = op.parse_chat_request(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]}
    )
    assert op.chat_prompt_ids(dev, tok) == op.chat_prompt_ids(sys, tok)
    last = op.parse_chat_request(
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}
    )
    assert op.chat_prompt_ids(last, tok)


def test_check_prompt():
    op.check_prompt([5, 6], vocab_size=10, max_model_len=8, max_tokens=6)
    cases = [
        (dict(ids=[]), "prompt", None),
        (dict(ids=[5, 10]), "prompt", None),
        (dict(ids=[-1]), "prompt", None),
        (dict(ids=list(range(8))), "prompt", "context_length_exceeded"),
        (dict(ids=[5, 6], max_tokens=7), "prompt", "context_length_exceeded"),
        (dict(ids=[5] * 9, param="messages"), "messages", "context_length_exceeded"),
    ]
    for kw, param, code in cases:
        with pytest.raises(op.APIError) as e:
            op.check_prompt(**{"vocab_size": 10, "max_model_len": 8, **kw})
        assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    with pytest.raises(op.APIError) as e:
        op.check_prompt(list(range(8)), 10, 8)
    assert e.value.message.startswith(
        "This model's maximum context length is 8 tokens. However, your prompt has 8 tokens"
    )


def test_sampling_params():
    req = op.parse_chat_request(
        chat(temperature=0, top_p=0.5, seed=7, n=3, logprobs=True, return_routed_experts=True)
    )
    ps = [op.sampling_params(req, i, default_max_tokens=99) for i in range(3)]
    assert [p.seed for p in ps] == [7, 8, 9]
    assert ps[0].max_tokens == 99 and ps[0].greedy and ps[0].top_p == 0.5
    assert ps[0].logprobs == 0 and ps[0].return_routed_experts
    req = op.parse_chat_request(chat(logprobs=True, top_logprobs=5, max_tokens=3, temperature=None))
    p = op.sampling_params(req)
    assert (p.logprobs, p.max_tokens, p.temperature, p.seed) == (5, 3, 1.0, None)
    assert op.sampling_params(op.parse_chat_request(chat())).logprobs is None
    creq = op.parse_completion_request({"prompt": "x", "logprobs": 2, "seed": 2**64 - 1, "n": 2})
    p = op.sampling_params(creq, 1)
    assert (p.logprobs, p.max_tokens, p.seed) == (2, 16, 0)


# -- TextStream -------------------------------------------------------------------------------


def stream_all(tok, ids, stop=(), stop_ids=(), logprobs=True):
    s = TextStream(tok, stop, stop_ids)
    deltas = [s.push(t, -0.5 if logprobs else None, [(t, -0.5)]) for t in ids]
    deltas.append(s.finish())
    return s, deltas


def cut_at_stop(text, stop):
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return text[: min(hits)] if hits else text


def check_alignment(tok, s, deltas):
    """Released tokens come with exactly the text they decode to, in order."""
    text = "".join(d.text for d in deltas)
    assert text == s.text
    for d in deltas:
        assert [t.offset for t in d.tokens] == sorted(t.offset for t in d.tokens)
    offsets = [t.offset for t in s.tokens]
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)


TEXTS = [
    "你好 🙂 world",
    "Emoji: 🙂 😀 🚀 ❤️ and 中文：你好，世界！",
    "The capital of France is Paris.\nUser: hi",
    "café naïve Zürich — Ελληνικά русский",
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_full_decode_of_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    s, deltas = stream_all(tok, ids)
    assert "".join(d.text for d in deltas) == text
    assert not any("\ufffd" in d.text for d in deltas)
    assert [t.token_id for t in s.tokens] == ids
    check_alignment(tok, s, deltas)


def test_stream_matches_full_decode_of_random_ids(tok, cfg):
    rng = random.Random(0)
    multibyte = tok.encode("你好 🙂 😀 🚀 ❤️ 中文 café", add_special_tokens=False)
    for trial in range(200):
        n = rng.randrange(1, 40)
        pool = range(cfg.vocab_size) if trial % 2 else multibyte + [0, 1, 3]
        ids = [rng.choice(pool) for _ in range(n)]
        s, deltas = stream_all(tok, ids)
        assert "".join(d.text for d in deltas) == tok.decode(ids, skip_special_tokens=True)
        assert len(s.tokens) == n
        check_alignment(tok, s, deltas)


def test_stop_strings_random(tok, cfg):
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(5, cfg.vocab_size) for _ in range(rng.randrange(1, 30))]
        full = tok.decode(ids, skip_special_tokens=True)
        if len(full) < 3:
            continue
        a = rng.randrange(len(full))
        stop = [full[a : a + rng.randrange(1, 5)], "zzq"]
        s, deltas = stream_all(tok, ids, stop)
        assert "".join(d.text for d in deltas) == cut_at_stop(full, stop)
        assert s.stopped
        check_alignment(tok, s, deltas)


def test_stop_spanning_tokens_is_cut_exactly(tok):
    ids = tok.encode("The capital of France is Paris.", add_special_tokens=False)
    s, deltas = stream_all(tok, ids, stop=["of Fr"])
    assert s.text == "The capital " and s.stopped
    assert deltas[-1].text == "" and any(d.stopped for d in deltas)
    assert "".join(token_text(tok, t.token_id) for t in s.tokens).startswith("The capital")


def test_stop_at_the_start_and_earliest_of_several(tok):
    ids = tok.encode("Hello there, the sea", add_special_tokens=False)
    s, _ = stream_all(tok, ids, stop=["Hello"])
    assert s.text == "" and s.stopped
    # the stop string's tokens were generated: counted, with logprobs, at the end of the text
    assert [t.token_id for t in s.tokens] == ids[: s.num_tokens] and s.num_tokens >= 1
    assert all(t.offset == 0 for t in s.tokens)
    s, _ = stream_all(tok, ids, stop=["sea", "there", ", "])
    assert s.text == "Hello "


def test_held_tail_released_when_disambiguated(tok):
    s = TextStream(tok, stop=["sea!"])
    out = [s.push(t).text for t in tok.encode("the sea is", add_special_tokens=False)]
    out.append(s.finish().text)
    assert "".join(out) == "the sea is" and not s.stopped
    s = TextStream(tok, stop=["sea!"])
    held = "".join(s.push(t).text for t in tok.encode("the se", add_special_tokens=False))
    # text goes out token by token: the token " se" waits whole
    assert held == "the" and s.finish().text == " se"


def test_min_tokens_hold_off_stop_strings(tok):
    """As vLLM: a stop string ending within the first min_tokens tokens does not stop the text;
    the next one does."""
    ids = tok.encode("Hello sea, hello sea! Bye", add_special_tokens=False)
    k = next(n for n in range(1, len(ids)) if "sea" in tok.decode(ids[:n]))
    for min_tokens, text in [(0, "Hello "), (k - 1, "Hello "), (k, "Hello sea, hello ")]:
        s = TextStream(tok, stop=["sea"], min_tokens=min_tokens)
        out = "".join(s.push(t).text for t in ids)
        assert s.stopped and out == s.text == text


def test_stop_tokens_make_no_text_and_pushes_after_stop_are_ignored(tok):
    ids = tok.encode("Hello", add_special_tokens=False)
    s, deltas = stream_all(tok, [*ids, 2], stop_ids=EOS)
    assert s.text == "Hello" and s.num_tokens == len(ids) + 1
    # the EOS is counted and has its entry, with no text, at the end of the text
    assert [t.token_id for t in s.tokens] == [*ids, 2] and s.tokens[-1].offset == len("Hello")
    assert deltas[-2].tokens[-1].token_id == 2 or deltas[-1].tokens[-1].token_id == 2
    s = TextStream(tok, stop=["ll"])
    for t in ids:
        s.push(t)
    n = s.num_tokens
    assert s.stopped and s.push(5).text == "" and s.finish().stopped
    assert s.num_tokens == n == len(s.tokens)  # pushes after the stop are not counted


def test_incomplete_character_is_flushed_at_finish(tok):
    ids = tok.encode("你", add_special_tokens=False)[:-1]
    s = TextStream(tok)
    assert all(s.push(t).text == "" for t in ids)
    assert s.finish().text == tok.decode(ids) == "\ufffd"


def test_token_bytes(tok):
    ids = tok.encode("你好 🙂 world", add_special_tokens=False)
    assert b"".join(token_bytes(tok, t) for t in ids) == "你好 🙂 world".encode()
    assert token_text(tok, ids[0]).startswith("\\x")
    assert token_bytes(tok, 10_000) == b""


def test_push_event(tok):
    s = TextStream(tok)
    first = tok.encode("Hi", add_special_tokens=False)[0]
    s.push_event(TokenEvent("r", first, -1.0, [[5, -1.0]], [[1, 2]]))
    s.push_event(TokenEvent("r", None, finish_reason="abort"))
    s.finish()
    assert s.tokens[0].top_logprobs == [(5, -1.0)] and s.tokens[0].routed_experts == [[1, 2]]


# -- response shapes ---------------------------------------------------------------------------

SSE_HEADERS = {"content-type": "text/event-stream"}


def mock_client(handler) -> openai.OpenAI:
    """The official client, answered by `handler(request) -> httpx.Response` in process."""
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return openai.OpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)


def test_client_reads_errors():
    err = chat_error(temperature=-1)
    client = mock_client(lambda request: httpx.Response(err.status, json=err.body()))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.param == "temperature" and e.value.type == "invalid_request_error"
    assert e.value.status_code == 400


def test_client_streams_chat(tok, cfg):
    req = op.parse_chat_request(chat(stream=True, stream_options={"include_usage": True}))
    s, deltas, reason = run_choice(tok, req, "你好 🙂 the sea")
    h = resp.chat_header("tiny")
    chunks = [
        resp.chat_role_chunk(h, 0),
        *(resp.chat_delta_chunk(h, req, 0, d, tok) for d in deltas),
    ]
    chunks += [
        resp.chat_finish_chunk(h, 0, reason),
        resp.chat_usage_chunk(h, resp.usage(3, 4, cfg)),
    ]
    body = "".join(resp.sse(c) for c in chunks if c) + resp.SSE_DONE
    client = mock_client(lambda request: httpx.Response(200, text=body, headers=SSE_HEADERS))
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], stream=True
    )
    parsed = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parsed if p.choices) == s.text
    assert parsed[-1].usage.completion_tokens == 4


def run_choice(tok, req, text, *, eos=True):
    ids = tok.encode(text, add_special_tokens=False) + ([2] if eos else [])
    s = op.text_stream(req, tok, EOS)
    deltas = [s.push(t, -0.25, [(t, -0.25), (7, -3.0)], [[0, 1], [2, 3]]) for t in ids]
    deltas.append(s.finish())
    return s, deltas, ("stop" if eos else "length")


def test_chat_completion_parses(tok, cfg):
    req = op.parse_chat_request(chat(logprobs=True, top_logprobs=2, return_routed_experts=True))
    s, _, reason = run_choice(tok, req, "你好 🙂 the sea")
    h = resp.chat_header("tiny")
    body = resp.chat_completion(
        h,
        [resp.chat_choice(req, 0, s, op.finish_reason(reason, s), tok)],
        resp.usage(10, s.num_tokens, cfg),
    )
    obj = ChatCompletion.model_validate(json.loads(json.dumps(body)))
    assert obj.id.startswith("chatcmpl-") and obj.object == "chat.completion"
    choice = obj.choices[0]
    assert choice.message.content == "你好 🙂 the sea" and choice.finish_reason == "stop"
    content = choice.logprobs.content
    assert bytes(b for c in content for b in c.bytes) == "你好 🙂 the sea".encode()
    assert len(content[0].top_logprobs) == 2 and content[0].logprob == -0.25
    assert body["choices"][0]["routed_experts"][0] == [[0, 1], [2, 3]]
    assert obj.usage.total_tokens == 10 + s.num_tokens
    assert (
        obj.usage.model_extra["flops"]["spent"] < obj.usage.model_extra["flops"]["dense_equivalent"]
    )


def test_chat_chunks_parse(tok, cfg):
    req = op.parse_chat_request(
        chat(stream=True, stream_options={"include_usage": True}, logprobs=True, stop=["sea"])
    )
    s, deltas, _ = run_choice(tok, req, "你好 🙂 the sea is wide", eos=False)
    h = resp.chat_header("tiny")
    chunks = [resp.chat_role_chunk(h, 0)]
    chunks += [c for d in deltas if (c := resp.chat_delta_chunk(h, req, 0, d, tok))]
    chunks.append(resp.chat_finish_chunk(h, 0, op.finish_reason("length", s)))
    chunks.append(resp.chat_usage_chunk(h, resp.usage(5, s.num_tokens, cfg)))
    parsed = []
    for c in chunks:
        line = resp.sse(c)
        assert line.startswith("data: ") and line.endswith("\n\n")
        parsed.append(ChatCompletionChunk.model_validate(json.loads(line[6:])))
    assert parsed[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parsed[:-1]) == "你好 🙂 the "
    assert parsed[-2].choices[0].finish_reason == "stop"
    assert parsed[-1].choices == [] and parsed[-1].usage.prompt_tokens == 5
    assert {p.id for p in parsed} == {h.id} and parsed[0].object == "chat.completion.chunk"
    assert all(p.choices[0].logprobs is not None for p in parsed[1:-2])


def test_completion_and_chunks_parse(tok, cfg):
    req = op.parse_completion_request({"prompt": "x", "logprobs": 1, "n": 2})
    s, deltas, reason = run_choice(tok, req, "the sea 🙂")
    h = resp.completion_header("tiny")
    choice = resp.completion_choice(req, op.completion_index(1, 1, 2), s, reason, tok)
    obj = Completion.model_validate(
        json.loads(json.dumps(resp.completion_response(h, [choice], resp.usage(1, 4, cfg))))
    )
    assert obj.object == "text_completion" and obj.id.startswith("cmpl-")
    c = obj.choices[0]
    assert c.index == 3 and c.text == "the sea 🙂" and c.finish_reason == "stop"
    assert c.logprobs.text_offset[0] == 0 and c.logprobs.token_logprobs[0] == -0.25
    assert "".join(c.logprobs.tokens[:3]) == "the sea"
    assert len(c.logprobs.top_logprobs[0]) == 2
    chunks = [resp.completion_chunk(h, req, 0, d, tok) for d in deltas]
    chunks.append(resp.completion_chunk(h, req, 0, deltas[-1], tok, "stop"))
    chunks.append(resp.completion_usage_chunk(h, resp.usage(1, 4, cfg)))
    # streamed completions carry finish_reason null until the end, as OpenAI's do; the client
    # parses stream chunks without validating that Literal, so go through the client itself
    body = "".join(resp.sse(c) for c in chunks if c) + resp.SSE_DONE
    client = mock_client(lambda request: httpx.Response(200, text=body, headers=SSE_HEADERS))
    parsed = list(client.completions.create(model="tiny", prompt="x", stream=True))
    assert all(isinstance(p, Completion) for p in parsed)
    assert "".join(p.choices[0].text for p in parsed[:-1]) == "the sea 🙂"
    assert parsed[-2].choices[0].finish_reason == "stop" and parsed[-1].usage.total_tokens == 5
    assert parsed[0].choices[0].logprobs.tokens


def test_no_logprobs_when_not_asked(tok):
    req = op.parse_chat_request(chat())
    s, deltas, reason = run_choice(tok, req, "sea")
    choice = resp.chat_choice(req, 0, s, reason, tok)
    assert choice["logprobs"] is None and "routed_experts" not in choice
    creq = op.parse_completion_request({"prompt": "x"})
    assert resp.completion_choice(creq, 0, s, reason, tok)["logprobs"] is None


# -- errors and usage -------------------------------------------------------------------------


def test_error_for_event():
    cases = [
        (
            ErrorKind.UNAVAILABLE,
            "expert workers unavailable: worker 1 died",
            503,
            "service_unavailable",
        ),
        (ErrorKind.INVALID, "the prompt is empty", 400, "invalid_request_error"),
        (ErrorKind.OVERLOADED, "the waiting queue is full (8 requests)", 429, None),
        (ErrorKind.INTERNAL, "internal error: boom", 500, "internal_error"),
        (None, "no kind given", 500, "internal_error"),
    ]
    for kind, message, status, type_ in cases:
        ev = TokenEvent("r", None, finish_reason="error", error=message, error_kind=kind)
        err = op.error_for_event(ev)
        assert err.status == status and err.message == message
        assert type_ is None or err.type == type_
    body = op.model_not_found("x").body()["error"]
    assert body["code"] == "model_not_found" and body["type"] == "not_found_error"


ERNIE_21B = {
    "model_type": "ernie4_5_moe",
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "num_hidden_layers": 28,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 103424,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "use_bias": False,
    "moe_num_experts": 64,
    "moe_k": 6,
    "moe_num_shared_experts": 2,
    "moe_intermediate_size": 1536,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": 27,
    "moe_layer_interval": 1,
}


def test_param_counts_of_ernie_21b():
    cfg = ModelConfig.from_dict(ERNIE_21B)
    total, active = resp.param_counts(cfg)
    assert 20.5e9 < total < 22.5e9, total  # "21B"
    assert 3.0e9 < active < 3.5e9, active  # "A3B"; DESIGN.md: about 3.3B active
    u = resp.usage(100, 20, cfg)
    assert u["active_params_per_token"] == active
    assert u["flops"]["spent"] == 2 * active * 120
    assert u["flops"]["dense_equivalent"] == 2 * total * 120


def checkpoint_params(path) -> int:
    """Parameters stored in a checkpoint, mtp* tensors left out."""
    n = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if not k.startswith(("mtp", "model.mtp")):
                    n += math.prod(st.get_slice(k).get_shape())
    return n


@pytest.mark.parametrize(
    "kw", [{}, dict(use_bias=True, tie_word_embeddings=False, shared=2, moe_interval=2, seed=3)]
)
def test_param_counts_match_the_checkpoint(make_checkpoint, kw):
    path = make_checkpoint(**kw)
    assert resp.param_counts(ModelConfig.from_dir(path))[0] == checkpoint_params(path)


def test_sse():
    assert resp.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'
    assert resp.SSE_DONE == "data: [DONE]\n\n"


def test_without_a_tokenizer_only_token_id_completions(cfg):
    """No tokenizer: chat, text prompts and stop strings are 400s naming their field; a
    token-id completion streams its ids with no text, each token released as it comes."""
    cases = [
        (op.parse_chat_request({"messages": [{"role": "user", "content": "hi"}]}), "messages"),
        (op.parse_completion_request({"prompt": "hi"}), "prompt"),
        (op.parse_completion_request({"prompt": ["hi", "there"]}), "prompt"),
        (op.parse_completion_request({"prompt": [1, 2], "stop": ["x"]}), "stop"),
    ]
    for req, param in cases:
        with pytest.raises(op.APIError) as e:
            op.check_without_tokenizer(req, "m")
        assert e.value.status == 400 and e.value.param == param
    req = op.parse_completion_request({"prompt": [[1, 2]], "return_token_ids": True, "logprobs": 0})
    op.check_without_tokenizer(req, "m")
    s = op.text_stream(req, None, stop_token_ids=[2])
    h = resp.completion_header("m")
    first = resp.completion_chunk(h, req, 0, s.push(7, -0.5), None, prompt_ids=[1, 2])
    assert {k: v for k, v in first["choices"][0].items() if k != "logprobs"} == {
        "index": 0,
        "text": "",
        "finish_reason": None,
        "prompt_token_ids": [1, 2],
        "token_ids": [7],
    }
    assert first["choices"][0]["logprobs"]["tokens"] == ["token_id:7"]
    s.push(2, -1.0)  # EOS: counted, no text
    choice = resp.completion_choice(req, 0, s, "stop", None, [1, 2])
    assert choice["token_ids"] == [7, 2] and choice["text"] == "" and s.num_tokens == 2


def test_echo_puts_the_prompt_before_the_text_and_its_logprobs(tok):
    """Completions' `echo`: the prompt's text first; with logprobs, its tokens' entries first
    (no logprob for the first), the answer's offsets shifted by the prompt's text."""
    req = op.parse_completion_request({"prompt": "the sea", "echo": True, "logprobs": 1})
    assert op.sampling_params(req).prompt_logprobs == 1
    assert op.sampling_params(op.parse_completion_request({"prompt": "x"})).prompt_logprobs is None
    only = op.parse_completion_request({"prompt": "x", "echo": True, "max_tokens": 0})
    assert only.scores_only and op.sampling_params(only).max_tokens == 1  # one, dropped
    prompt = op.completion_prompts(req, tok)[0]
    assert op.echo_texts(req, [prompt], tok) == ["the sea"]
    ids_req = op.parse_completion_request({"prompt": prompt, "echo": True})
    assert op.echo_texts(ids_req, [prompt], tok) == [tok.decode(prompt)]
    plps = [None] + [(-0.5 - i, [(7, -0.1)]) for i in range(len(prompt) - 1)]
    s, _, reason = run_choice(tok, req, " is blue")
    echo = resp.Echo("the sea", prompt, plps)
    choice = resp.completion_choice(req, 0, s, reason, tok, echo=echo)
    assert choice["text"] == "the sea is blue"
    lp = choice["logprobs"]
    n = len(prompt)
    assert "".join(lp["tokens"][:n]) == "the sea" and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:n] == [-0.5 - i for i in range(n - 1)]
    assert lp["top_logprobs"][0] is None and len(lp["top_logprobs"][1]) == 2
    assert lp["text_offset"][n] == len("the sea")  # the answer's first token
    assert len(lp["tokens"]) == n + s.num_tokens

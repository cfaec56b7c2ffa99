"""A checkpoint without a tokenizer, served on token ids through `expertmesh serve`.

transformers' `save_pretrained` writes weights and configs but no tokenizer. Such a checkpoint
is served as vLLM serves one with `--skip-tokenizer-init`: completions of token-id prompts,
answered with the ids (`token_ids`, and `prompt_token_ids`) and an empty text. What needs a
tokenizer (chat and its template, text prompts, stop strings) is a 400 naming the field. The
oracle for the ids is transformers' model on the same checkpoint, greedy by recomputing the
whole prefix at each step.
"""

from __future__ import annotations

import openai
import pytest
import torch
from conftest import hf_text_model, recomputed_greedy, reference_model
from serving import Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
MODEL = "no-tokenizer"
VOCAB = 300
PROMPTS = [[5, 17, 42, 99, 3], [250, 1, 7]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = hf_text_model(
        0,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        moe_num_experts=8,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("ckpt") / MODEL
    model.save_pretrained(path)
    assert not list(path.glob("tokenizer*"))
    return path


def greedy(path, prompt: list[int], n: int) -> list[int]:
    return recomputed_greedy(reference_model(path), prompt, n)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    s = Server(
        *("--model", str(ckpt), "--workers", "2", "--transport", "local"),
        *("--max-model-len", "256"),
        log_path=tmp_path_factory.mktemp("log") / "serve.log",
    )
    yield s
    assert s.stop() == set(), "processes left behind after SIGTERM"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


IGNORE_EOS = {"ignore_eos": True}  # random weights may well pick EOS (id 2)


def test_card_says_no_chat(server):
    card = server.get("/v1/models").json()["data"][0]
    assert card["capabilities"]["chat"] is False


def test_greedy_token_ids_match_transformers(client, ckpt):
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS, max_tokens=8, temperature=0, extra_body=IGNORE_EOS
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c, prompt in zip(r.choices, PROMPTS):
        assert c.text == "" and c.finish_reason == "length"
        assert c.prompt_token_ids == prompt
        assert c.token_ids == greedy(ckpt, prompt, 8)
    assert r.usage.prompt_tokens == 8 and r.usage.completion_tokens == 16


def test_streamed_ids_are_the_same(client, ckpt):
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPTS[0],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
    )
    body = [c for c in chunks if c.choices]
    assert body[0].choices[0].prompt_token_ids == PROMPTS[0]
    assert all(getattr(c.choices[0], "prompt_token_ids", None) is None for c in body[1:])
    ids = [t for c in body for t in c.choices[0].token_ids]
    assert ids == greedy(ckpt, PROMPTS[0], 8) and chunks[-1].usage.completion_tokens == 8
    assert "".join(c.choices[0].text for c in body) == ""


def test_sampled_choices_and_logprobs_name_ids(client):
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=6, n=2, seed=7, logprobs=2)
    r = client.completions.create(**kw, extra_body=IGNORE_EOS)
    again = client.completions.create(**kw, extra_body=IGNORE_EOS)
    assert [c.token_ids for c in r.choices] == [c.token_ids for c in again.choices]
    for c in r.choices:
        assert len(c.token_ids) == 6 and all(0 <= t < VOCAB for t in c.token_ids)
        assert c.logprobs.tokens == [f"token_id:{t}" for t in c.token_ids]
        assert all(len(top) >= 2 for top in c.logprobs.top_logprobs)


def test_stop_token_ids_end_the_answer(client, ckpt):
    want = greedy(ckpt, PROMPTS[0], 8)
    stop = want[3]
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=0,
        extra_body=IGNORE_EOS | {"stop_token_ids": [stop]},
    )
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.token_ids == want[: want.index(stop) + 1]


@pytest.mark.parametrize(
    "path, fields, param",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ("/v1/completions", {"prompt": "hello"}, "prompt"),
        ("/v1/completions", {"prompt": ["hello", "there"]}, "prompt"),
        ("/v1/completions", {"prompt": [1, 2], "stop": "x"}, "stop"),
    ],
)
def test_what_needs_a_tokenizer_is_a_400(server, path, fields, param):
    r = server.post(path, json={"model": MODEL, "max_tokens": 4, **fields})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert "no tokenizer" in err["message"]
    assert server.post("/v1/completions", json={"model": MODEL, "prompt": [1]}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_echo_scores_the_prompt(client, ckpt, stream):
    """`echo` with `logprobs` (how lm-evaluation-harness scores a text): each prompt token's
    logprob under transformers' model, the first without one, then the answer's."""
    prompt = PROMPTS[0]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=2, echo=True)
    if stream:
        chunks = [c for c in client.completions.create(**kw, stream=True) if c.choices]
        tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
        lps = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
        tops = [x for c in chunks for x in c.choices[0].logprobs.top_logprobs]
    else:
        lp = client.completions.create(**kw).choices[0].logprobs
        tokens, lps, tops = lp.tokens, lp.token_logprobs, lp.top_logprobs
    with torch.no_grad():
        logits = reference_model(ckpt)(torch.tensor([prompt])).logits[0]
    want = torch.log_softmax(logits, dim=-1)
    assert tokens[: len(prompt)] == [f"token_id:{t}" for t in prompt] and len(tokens) == 6
    assert lps[0] is None and tops[0] is None
    for i in range(1, len(prompt)):
        assert abs(lps[i] - float(want[i - 1, prompt[i]])) <= 1e-4
        assert len(tops[i]) >= 2
    assert abs(lps[-1] - float(want[-1].max())) <= 1e-4  # the greedy answer's token


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_is_the_prompt_alone(client, ckpt, stream):
    prompt = PROMPTS[1]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=0, logprobs=0, echo=True)
    if stream:
        chunks = list(
            client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        )
        body = [c for c in chunks if c.choices]
        assert len(body) == 1
        c, usage = body[0].choices[0], chunks[-1].usage
    else:
        r = client.completions.create(**kw)
        c, usage = r.choices[0], r.usage
    with torch.no_grad():
        want = torch.log_softmax(reference_model(ckpt)(torch.tensor([prompt])).logits[0], -1)
    assert c.finish_reason == "length" and c.token_ids == [] and c.text == ""
    assert c.logprobs.tokens == [f"token_id:{t}" for t in prompt]
    assert c.logprobs.token_logprobs[0] is None
    for i in range(1, len(prompt)):
        assert abs(c.logprobs.token_logprobs[i] - float(want[i - 1, prompt[i]])) <= 1e-4
    assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as e:  # 0 without echo
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"

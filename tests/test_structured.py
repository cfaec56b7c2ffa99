"""Structured output: a JSON schema's grammar constrains what the engine draws.

On a random tiny checkpoint, whose unconstrained answers are noise: greedy and sampled answers
parse and hold to the schema, a JSON-object answer is a JSON object, the grammar masks exactly
the tokens it forbids, and a resumed request (failover) continues with the same tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFIGS
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.tokenizer import load_tokenizer
from expertmesh.router.engine import LLMEngine, RequestError
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.structured import (
    JSON_OBJECT,
    Grammars,
    StructuredOutputError,
    check_spec,
    schema_spec,
)

pytest.importorskip("xgrammar", reason="structured output is an optional extra")

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"enum": [1, 2, 3]},
        "word": {"type": "string", "maxLength": 4},
    },
    "required": ["ok", "n", "word"],
    "additionalProperties": False,
}


def holds_to_schema(value) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"ok", "n", "word"}
        and isinstance(value["ok"], bool)
        and value["n"] in (1, 2, 3)
        and isinstance(value["word"], str)
        and len(value["word"]) <= 4
    )


@pytest.fixture(scope="module")
def engine(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    return LLMEngine.from_checkpoint(path, num_shards=2)


@pytest.fixture(scope="module")
def tok(make_checkpoint):
    return load_tokenizer(make_checkpoint(**CONFIGS["top2of8-shared1"]))


def answer(engine, tok, prompt, **kw) -> tuple[str, str]:
    out = engine.generate([prompt], SamplingParams(**kw))[0]
    return tok.decode(out.token_ids, skip_special_tokens=True), out.finish_reason


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 1), (1.0, 2), (1.5, 3)])
def test_answers_hold_to_the_schema(engine, tok, temperature, seed):
    spec = schema_spec(SCHEMA)
    free, _ = answer(engine, tok, [5, 6, 7], max_tokens=40, temperature=temperature, seed=seed)
    text, reason = answer(
        engine, tok, [5, 6, 7], max_tokens=40, temperature=temperature, seed=seed, structured=spec
    )
    assert reason == "stop" and holds_to_schema(json.loads(text)), text
    assert free != text  # the model alone writes something else


def test_a_json_object_answer_is_an_object(engine, tok):
    for seed in range(3):
        text, reason = answer(
            engine, tok, [9, 8], max_tokens=200, temperature=1.0, seed=seed, structured=JSON_OBJECT
        )
        assert text.startswith("{")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_the_mask_allows_exactly_the_grammar(make_checkpoint, tok):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    cfg = ModelConfig.from_dir(path)
    m = Grammars(path, cfg).matcher(schema_spec({"enum": ["yes", "no"]}))
    allowed = (m.mask(torch.zeros(cfg.vocab_size)) == 0).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).startswith('"') for t in allowed)
    for t in tok.encode('"no"', add_special_tokens=False):
        assert m.accept(t)
    allowed = (m.mask(torch.zeros(cfg.vocab_size)) == 0).nonzero().flatten().tolist()
    assert allowed and set(allowed) <= set(cfg.eos_token_ids)  # complete: only the end
    assert not m.accept(tok.encode("x", add_special_tokens=False)[0])  # refused, no change


def test_a_resumed_structured_request_continues_with_the_same_tokens(make_checkpoint, engine):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    p = SamplingParams(max_tokens=40, temperature=1.0, seed=11, structured=schema_spec(SCHEMA))
    full = engine.generate([[4, 4, 4]], p)[0].token_ids
    fresh = LLMEngine.from_checkpoint(path, num_shards=1)
    fresh.add_request("r", [4, 4, 4], p, resume_ids=full[:5])
    out = []
    while fresh.has_work():
        out += [ev.token_id for ev in fresh.step()]
    assert full[:5] + out == full


def test_bad_specs_are_refused(engine):
    with pytest.raises(StructuredOutputError):
        check_spec(json.dumps({"type": "nonsense"}))
    check_spec(schema_spec(SCHEMA))
    with pytest.raises(RequestError, match="schema"):
        engine.add_request("bad", [1, 2], SamplingParams(structured='{"type": "nonsense"}'))
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(structured=JSON_OBJECT, min_tokens=2)

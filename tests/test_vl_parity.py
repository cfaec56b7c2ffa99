"""The engine against transformers' Ernie4_5_VLMoeForConditionalGeneration, in process (fp32).

Cases: text only, one image, two images of different sizes, an image in the second turn;
full-prompt logits (`score`) and greedy continuations, with 1, 2 and 4 expert shards. Also:
a check that fails when image tokens are routed to the text experts, and routing reports.
"""

from __future__ import annotations

import queue

import pytest
import torch
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.image import ImageInputs, ImageSettings, preprocess
from expertmesh.router import gate
from expertmesh.router.engine import EngineConfig, LLMEngine, RequestError
from expertmesh.router.loop import EngineLoop
from expertmesh.router.sampling import SamplingParams
from expertmesh.workers.placement import ExpertPlacement
from vl_reference import CASES, TOL, image, max_diff, prompt, ref_greedy, ref_logits

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def engines(vl_checkpoint):
    """engines(shards) -> an in-process engine over the tiny VL checkpoint; made once each."""
    made: dict[int, LLMEngine] = {}

    def get(shards: int) -> LLMEngine:
        if shards not in made:
            made[shards] = LLMEngine.from_checkpoint(vl_checkpoint, num_shards=shards)
        return made[shards]

    return get


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_reference(vl_checkpoint, engines, name, shards):
    ids, images = prompt(vl_checkpoint, name)
    got = engines(shards).score([ids], images=[images])[0]
    assert max_diff(got, ref_logits(vl_checkpoint, name)) <= TOL


def test_all_cases_in_one_batch(vl_checkpoint, engines):
    """A ragged batch mixing text-only and image prompts, scored and generated together."""
    names = list(CASES)
    prompts, images = zip(*(prompt(vl_checkpoint, n) for n in names))
    engine = engines(2)
    for name, got in zip(names, engine.score(prompts, images=images)):
        assert max_diff(got, ref_logits(vl_checkpoint, name)) <= TOL
    outs = engine.generate(prompts, GREEDY, images=images)
    assert [o.token_ids for o in outs] == [ref_greedy(vl_checkpoint, n, 12) for n in names]


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_matches_transformers_generate(vl_checkpoint, engines, name):
    ids, images = prompt(vl_checkpoint, name)
    out = engines(1).generate([ids], GREEDY, images=[images])[0]
    assert out.token_ids == ref_greedy(vl_checkpoint, name, 12)


def test_preprocessed_images_and_the_engine_loop(vl_checkpoint, engines):
    """Images as pixel_values + grid_thw give the same logits; the loop thread passes them on."""
    ids, images = prompt(vl_checkpoint, "two-images")
    inputs = preprocess(images, ImageSettings.from_dir(vl_checkpoint))
    got = engines(2).score([ids], images=[inputs])[0]
    assert max_diff(got, ref_logits(vl_checkpoint, "two-images")) <= TOL
    loop, events = EngineLoop(engines(2)), queue.Queue()
    try:
        loop.submit("a", ids, GREEDY, events.put, images=inputs)
        loop.submit("b", ids, GREEDY, events.put, images=images[:1])  # refused, loop lives on
        tokens, bad = [], None
        while not tokens or tokens[-1].finish_reason is None:
            ev = events.get(timeout=120)
            if ev.request_id == "b":
                bad = ev
            else:
                tokens.append(ev)
    finally:
        loop.stop()
    assert [ev.token_id for ev in tokens] == ref_greedy(vl_checkpoint, "two-images", 12)
    assert bad is not None and bad.finish_reason == "error" and "placeholders" in bad.error


def test_chunked_prefill_splits_images(vl_checkpoint):
    """Prefill chunks of 5 tokens cut through the images; the images are encoded once."""
    cfg = EngineConfig(max_tokens_per_step=5, block_size=4)
    engine = LLMEngine.from_checkpoint(vl_checkpoint, cfg, num_shards=2)
    calls = []
    encode = engine.model.encode_images
    engine.model.encode_images = lambda *a: calls.append(1) or encode(*a)
    ids, images = prompt(vl_checkpoint, "two-images")
    out = engine.generate([ids], GREEDY, images=[images])[0]
    assert out.token_ids == ref_greedy(vl_checkpoint, "two-images", 12) and len(calls) == 1


def test_modality_pure_shards(vl_checkpoint):
    """Plain contiguous blocks: one worker holds only text experts, the other only vision."""
    cfg = ModelConfig.from_dir(vl_checkpoint)
    placement = ExpertPlacement.contiguous(cfg.num_experts, 2)
    engine = LLMEngine.from_checkpoint(vl_checkpoint, placement=placement)
    ids, images = prompt(vl_checkpoint, "two-images")
    got = engine.score([ids], images=[images])[0]
    assert max_diff(got, ref_logits(vl_checkpoint, "two-images")) <= TOL


def test_image_tokens_sent_to_text_experts_fail_parity(vl_checkpoint, engines, monkeypatch):
    """The parity check detects wrong routing: route every token by the text gate."""
    ids, images = prompt(vl_checkpoint, "one-image")
    want = ref_logits(vl_checkpoint, "one-image")
    engine = engines(2)
    assert max_diff(engine.score([ids], images=[images])[0], want) <= TOL
    route = gate.ModalGate.route
    monkeypatch.setattr(
        gate.ModalGate, "route", lambda self, x, b, vision, k, n: route(self, x, b, None, k, n)
    )
    assert max_diff(engine.score([ids], images=[images])[0], want) > 100 * TOL
    monkeypatch.undo()
    assert max_diff(engine.score([ids], images=[images])[0], want) <= TOL


def test_routing_reports_vision_experts_by_checkpoint_ids(vl_checkpoint):
    """Vision tokens go to experts E..2E-1 (the checkpoint's numbering), text tokens to 0..E-1;
    counts cover all 2E experts; return_routed_experts reports the same ids."""
    engine = LLMEngine.from_checkpoint(vl_checkpoint, num_shards=2)
    cfg, e = engine.model_cfg, engine.model_cfg.num_text_experts
    v = cfg.vision
    ids, images = prompt(vl_checkpoint, "one-image")
    cut = ids.index(v.image_end_token_id) + 1  # the prompt ends with the image: a vision token
    params = SamplingParams(
        max_tokens=2, temperature=0, ignore_eos=True, return_routed_experts=True
    )
    engine.add_request("r", ids[:cut], params, images)
    expanded = list(engine.requests["r"].seq.token_ids)
    events = engine.step()  # the whole prompt in one step
    vision = torch.isin(torch.tensor(expanded), torch.tensor(v.vision_token_ids))
    for layer_ids in engine.model.routing():  # [T, k] per MoE layer
        assert ((layer_ids >= e) == vision[:, None]).all()
    assert engine.expert_counts.shape == (len(cfg.moe_layers), 2 * e)
    assert engine.expert_counts[:, e:].sum() == vision.sum() * cfg.top_k * len(cfg.moe_layers)
    assert all(min(x) >= e for x in events[0].routed_experts)  # the last prompt token: vision
    events = engine.step()  # a generated token: text
    assert all(max(x) < e for x in events[0].routed_experts)


def test_requests_with_wrong_images_are_refused(vl_checkpoint, make_checkpoint, engines):
    ids, images = prompt(vl_checkpoint, "two-images")
    engine = engines(1)
    with pytest.raises(RequestError, match="2 image placeholders for 1 images"):
        engine.add_request("a", ids, GREEDY, images[:1])
    with pytest.raises(RequestError, match="2 image placeholders for 0 images"):
        engine.add_request("b", ids, GREEDY)
    good = preprocess(images, ImageSettings.from_dir(vl_checkpoint))
    short = ImageInputs(good.pixel_values[:-1], good.grid_thw)
    with pytest.raises(RequestError, match="pixel_values has shape"):
        engine.add_request("d", ids, GREEDY, short)
    odd = ImageInputs(good.pixel_values, good.grid_thw * torch.tensor([1, 1, 3]))
    with pytest.raises(RequestError, match="pixel_values has shape"):
        engine.add_request("e", ids, GREEDY, odd)
    with pytest.raises(RequestError, match="image 0 is a str, not a PIL image"):
        engine.add_request("f", ids, GREEDY, ["not an image", "nor this"])
    text = LLMEngine.from_checkpoint(make_checkpoint(experts=4, top_k=2, shared=1, layers=2))
    with pytest.raises(RequestError, match="takes no images"):
        text.add_request("c", [5, 6, 7], GREEDY, [image(40, 40)])
    assert not engine.requests and not text.requests

"""ERNIE-4.5-VL through the cluster: a Ray gateway actor and 2 expert-worker actors, on each
transport. Every case of vl_reference (text only, one image, two images of different sizes, an
image in the second turn) in one concurrent batch: greedy tokens identical to the in-process
engine and to transformers' generate; at each generated position the whole distribution
(logprobs of every vocabulary id, asked for as top_logprobs) within 1e-4 of the log-softmax of
transformers' logits over the same sequence, i.e. the logits up to their logsumexp. Also
`expertmesh generate --image` over the same transports.

One gateway per transport for the module; everything on 127.0.0.1; Ray is shut down at the end.
"""

from __future__ import annotations

import json

import pytest
import ray
import torch
from expertmesh.cluster.cli.engine_factory import ClusterEngine
from expertmesh.cluster.cli.main import main
from expertmesh.cluster.config import ClusterConfig
from expertmesh.cluster.runtime.launch import GatewayHandle, start_ray
from expertmesh.ernie.config import ModelConfig
from expertmesh.router.engine import LLMEngine
from expertmesh.router.sampling import SamplingParams
from vl_reference import CASES, TOL, max_diff, prompt, ref_greedy, ref_inputs, reference

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TRANSPORTS = ["grpc", "tcp", "collective"]
N = 8  # tokens per case: enough to leave every prompt, cheap on 2 cores


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    start_ray(num_cpus=16)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def gateways(vl_checkpoint):
    """gateways(transport) -> a GatewayHandle with 2 workers on the VL checkpoint, one each."""
    made: dict[str, GatewayHandle] = {}

    def get(transport: str) -> GatewayHandle:
        if transport not in made:
            cfg = ClusterConfig(model=str(vl_checkpoint), workers=2, transport=transport)
            made[transport] = GatewayHandle(cfg)
        return made[transport]

    yield get
    for h in made.values():
        h.shutdown()


@pytest.fixture(scope="module")
def params(vl_checkpoint) -> SamplingParams:
    """Greedy, with the logprobs of the whole vocabulary at each step."""
    vocab = ModelConfig.from_dir(vl_checkpoint).vocab_size
    return SamplingParams(max_tokens=N, temperature=0, logprobs=vocab)


@pytest.fixture(scope="module")
def in_process(vl_checkpoint, params):
    """The in-process engine's completions of every case (2 shards), computed once."""
    engine = LLMEngine.from_checkpoint(vl_checkpoint, num_shards=2)
    prompts, images = zip(*(prompt(vl_checkpoint, n) for n in CASES))
    outs = engine.generate(prompts, params, images=images)
    engine.close()
    return dict(zip(CASES, outs))


def distributions(out) -> torch.Tensor:
    """[steps, V] logprobs of every id at each step, from a completion's top_logprobs."""
    rows = []
    for top in out.top_logprobs:
        row = torch.full((len(top),), float("nan"))
        ids, lps = zip(*top)
        row[list(ids)] = torch.tensor(lps)
        rows.append(row)
    return torch.stack(rows)


def ref_step_logprobs(path, name: str, tokens: list[int]) -> torch.Tensor:
    """transformers' log-softmax [len(tokens), V] at each generated position: one forward over
    the processor's inputs for the case followed by the generated tokens (text)."""
    inputs = ref_inputs(path, name)
    n = inputs["input_ids"].shape[1]
    extra = torch.tensor([tokens[:-1]], dtype=torch.long)
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], extra], 1))
    for key in ("mm_token_type_ids", "moe_mm_token_type_ids"):
        if key in inputs:
            full[key] = torch.cat([inputs[key], torch.zeros_like(extra)], 1)
    with torch.no_grad():
        logits = reference(path)(**full).logits[0, n - 1 :].float()
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_case_through_the_gateway(vl_checkpoint, gateways, in_process, params, transport):
    h = gateways(transport)
    cfg = ModelConfig.from_dir(vl_checkpoint)
    e = cfg.num_text_experts
    for info in ray.get(h.actor.worker_infos.remote()):  # each worker: text and vision experts
        assert min(info["experts"]) < e <= max(info["experts"]), info["experts"]
    names = list(CASES)
    prompts, images = zip(*(prompt(vl_checkpoint, n) for n in names))  # PIL images
    outs = ClusterEngine(h).generate(prompts, params, images=list(images))
    for name, out in zip(names, outs, strict=True):
        local = in_process[name]
        assert out.token_ids == local.token_ids == ref_greedy(vl_checkpoint, name, N), name
        got, want = distributions(out), ref_step_logprobs(vl_checkpoint, name, out.token_ids)
        assert got.shape == want.shape and not got.isnan().any(), name
        assert max_diff(got, want) <= TOL, name
        assert max_diff(got, distributions(local)) <= TOL, name
        chosen = want.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert max_diff(torch.tensor(out.logprobs), chosen) <= TOL, name


def run_main(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_generate_command_with_images(capsys, tmp_path, vl_checkpoint, transport):
    """`expertmesh generate --image A --image B --transport T --workers 2` on the Ray already
    running (its own gateway, which it stops; Ray stays up)."""
    _, images = CASES["two-images"]
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
    ids, _ = prompt(vl_checkpoint, "two-images")
    code, out, err = run_main(
        capsys,
        *("generate", "--model", vl_checkpoint, "--prompt-ids", ",".join(map(str, ids))),
        *("--image", tmp_path / "0.png", "--image", tmp_path / "1.png"),
        *("--transport", transport, "--workers", 2, "--max-tokens", N, "--json"),
    )
    assert code == 0, err
    record = json.loads(out)
    assert record["token_ids"] == ref_greedy(vl_checkpoint, "two-images", N)
    assert record["prompt_ids"] == ids  # as given: one placeholder per image
    assert ray.is_initialized()

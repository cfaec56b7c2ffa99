"""Shared fixtures: small random checkpoints in the Hub layout and transformers' reference."""

from __future__ import annotations

import os

# Every Ray started by the tests stays on 127.0.0.1; Ray reads this when it is imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Ray waits 30 s by default for a new GCS to publish its port; a loaded 2-core CI machine
# has taken longer (see test_two_nodes.start_cluster).
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")

import functools  # noqa: E402

import pytest
import torch
from expertmesh.ernie.tiny import make_tiny

torch.set_num_threads(2)

# The configurations every parity test runs on; each checkpoint has nonzero correction biases.
CONFIGS = {
    "top2of8-shared1": dict(experts=8, top_k=2, shared=1),
    "top4of16-shared2-start2-every2": dict(
        experts=16, top_k=4, shared=2, moe_start=2, moe_interval=2, seed=1
    ),
    "top2of8-noshared": dict(experts=8, top_k=2, shared=0, seed=2),
    "bias-untied-top3of6": dict(
        experts=6, top_k=3, shared=1, use_bias=True, tie_word_embeddings=False, shards=1, seed=3
    ),
}


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(**make_tiny kwargs) -> path; each distinct checkpoint is made once."""

    @functools.cache
    def make(**kw):
        return make_tiny(tmp_path_factory.mktemp("ckpt"), **kw)

    return lambda **kw: make(**kw)


@pytest.fixture
def gateway():
    """gateway(**ClusterConfig fields) -> a GatewayHandle (Ray must be up); all shut down after."""
    from expertmesh.cluster.config import ClusterConfig
    from expertmesh.cluster.runtime.launch import GatewayHandle

    handles = []

    def launch(**kw):
        handles.append(GatewayHandle(ClusterConfig(**kw)))
        return handles[-1]

    yield launch
    for h in handles:
        h.shutdown()


@functools.cache
def reference_model(path):
    from transformers import Ernie4_5_MoeForCausalLM

    return Ernie4_5_MoeForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_text_model(seed: int = 0, **config):
    """transformers' Ernie4_5_MoeForCausalLM of `config`, its weights drawn from `seed` large
    enough that routing and logits differ clearly from position to position (nonzero
    correction biases; biases too where the config has them)."""
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**config)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.1 - 0.05)
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def recomputed_greedy(model, prompt: list[int], n: int) -> list[int]:
    """A transformers model's argmax continuation, the whole prefix recomputed at each step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def need_kernel(monkeypatch, setting: str, library, what: str) -> None:
    """A native kernel taken whatever the thread count (`setting`=1); a test fails, not skips,
    without it in CI."""
    monkeypatch.setenv(setting, "1")
    if library() is None:
        if os.environ.get("CI"):
            pytest.fail(f"the {what} kernel did not build (see the log's warning)")
        pytest.skip("no C++ compiler here")


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    # skip the special ids at the bottom of the vocabulary
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def vl_checkpoint(tmp_path_factory):
    """A tiny ERNIE-4.5-VL checkpoint written by transformers (4 text + 4 vision experts,
    top-2, one shared expert; layer 0 dense), with tokenizer and preprocessor config."""
    from expertmesh.ernie.tiny_vl import make_tiny_vl

    return make_tiny_vl(tmp_path_factory.mktemp("vl"), seed=0)

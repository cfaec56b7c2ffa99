"""The `expertmesh` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import CONFIGS, reference_model
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.tokenizer import load_tokenizer


def cli(*args, home=None):
    env = {**os.environ, "EXPERTMESH_HOME": str(home)} if home else None
    return subprocess.run(
        [sys.executable, "-m", "expertmesh.cluster.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_make_tiny(tmp_path):
    r = cli(
        "make-tiny",
        tmp_path / "m",
        "--experts",
        16,
        "--top-k",
        4,
        "--shared",
        2,
        "--layers",
        3,
        "--hidden",
        32,
        "--moe-start",
        2,
        "--seed",
        5,
    )
    assert r.returncode == 0, r.stderr
    cfg = ModelConfig.from_dir(tmp_path / "m")
    assert (cfg.num_experts, cfg.top_k, cfg.num_shared_experts, cfg.num_layers) == (16, 4, 2, 3)
    assert cfg.hidden_size == 32 and cfg.moe_layers == (2,)


def test_generate_json_matches_transformers(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top4of16-shared2-start2-every2"])
    prompt = [7, 100, 42, 9, 311]
    r = cli(
        "generate",
        "--model",
        path,
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--max-tokens",
        32,
        "--workers",
        3,
        "--transport",
        "local",
        "--json",
        "--logprobs",
        3,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    ref = reference_model(path)
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0].tolist()
        logits = ref(torch.tensor([want[:-1]])).logits[0]
    assert out["token_ids"] == want[len(prompt) :]
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1 :]
    chosen = logp.gather(-1, torch.tensor(out["token_ids"])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out["logprobs"]), chosen, atol=1e-4)
    assert len(out["top_logprobs"]) == 32 and len(out["top_logprobs"][0]) == 3
    tok = load_tokenizer(path)
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)


def test_generate_text_prompt_and_builtin_model(tmp_path):
    r = cli("generate", "--prompt", "Hello there", "--max-tokens", 5, "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tok = load_tokenizer(tmp_path / "ernie-tiny")
    assert out["prompt_ids"] == tok.encode("Hello there")
    assert 1 <= len(out["token_ids"]) <= 5


def test_generate_errors(make_checkpoint, tmp_path):
    r = cli("generate", "--model", tmp_path / "nope", "--prompt-ids", "1,2")
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = cli(
        "generate",
        "--model",
        make_checkpoint(**CONFIGS["top2of8-shared1"]),
        "--prompt-ids",
        "1,99999",
    )
    assert r.returncode != 0 and "outside the vocabulary" in r.stderr
    r = cli("generate", "--prompt-ids", "1", "--temperature", "-1", home=tmp_path)
    assert r.returncode == 2 and "--temperature" in r.stderr

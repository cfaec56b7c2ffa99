"""The `expertmesh` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CONFIGS, reference_model
from expertmesh.cluster.cli.main import main
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.tokenizer import load_tokenizer
from vl_reference import CASES, prompt, ref_greedy


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
    # up to 32 tokens: both stop at the first EOS
    assert len(out["top_logprobs"]) == len(out["token_ids"]) and len(out["top_logprobs"][0]) == 3
    tok = load_tokenizer(path)
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)


def test_generate_text_prompt_and_builtin_model(tmp_path):
    r = cli("generate", "--prompt", "Hello there", "--max-tokens", 5, "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (builtin,) = tmp_path.glob("ernie-tiny*")  # versioned: ernie-tiny-vN
    tok = load_tokenizer(builtin)
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


def test_generate_with_a_json_schema_and_penalties(capsys, make_checkpoint):
    """--json-schema constrains the answer; the penalties reach the sampler; a bad schema is a
    one-line error."""
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    schema = '{"type": "object", "properties": {"a": {"enum": ["yes", "no"]}}, "required": ["a"]}'
    base = ["generate", "--model", path, "--prompt-ids", "5,6,7", "--max-tokens", 40, "--json"]
    code, out, _ = run_main(capsys, *base, "--json-schema", schema, "--temperature", 1, "--seed", 2)
    assert code == 0 and json.loads(json.loads(out)["text"])["a"] in ("yes", "no")
    _, plain, _ = run_main(capsys, *base[:-3], "--max-tokens", 12, "--json")
    _, penalized, _ = run_main(
        capsys, *base[:-3], "--max-tokens", 12, "--json", "--repetition-penalty", "0.5"
    )
    assert json.loads(plain)["token_ids"] != json.loads(penalized)["token_ids"]
    code, _, _ = run_main(capsys, *base, "--json-schema", '{"type": "nonsense"}')
    assert str(code).endswith('--json-schema: unsupported JSON schema: Unsupported type "nonsense"')


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`expertmesh ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "command, args, flag",
    [
        ("generate", ["--max-tokens", "0"], "--max-tokens"),
        ("generate", ["--top-p", "2"], "--top-p"),
        ("serve", ["--workers", "x"], "--workers"),
        ("serve", ["--workers", "0"], "--workers"),
        ("bench engine", ["--tokens", "1"], "--tokens"),
        ("make-tiny", ["d", "--top-k", "0"], "--top-k"),
        ("make-tiny", ["d", "--vl", "--moe-start", "2"], "--vl does not take --moe-start"),
        ("make-tiny", ["d", "--vl", "--shards", "3"], "--vl does not take --shards"),
        ("make-tiny", ["d", "--vl", "--dtype", "float32"], "--vl does not take --dtype"),
        ("make-tiny", ["d", "--vl", "--no-readable-only"], "--readable-only"),
    ],
)
def test_argument_errors_show_the_subcommand_usage(capsys, command, args, flag):
    code, out, err = run_main(capsys, *command.split(), *args)
    assert code == 2 and out == ""
    assert err.startswith(f"usage: expertmesh {command} [-h]"), err
    last = err.splitlines()[-1]
    assert last.startswith(f"expertmesh {command}: error: ") and flag in last


def _not_a_model(tmp_path, kind: str):
    if kind == "missing":
        return tmp_path / "nope", "does not exist"
    if kind == "file":
        (tmp_path / "weights.bin").write_bytes(b"x")
        return tmp_path / "weights.bin", "is not a directory"
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", "no config.json"


@pytest.mark.parametrize("kind", ["missing", "file", "no-config"])
@pytest.mark.parametrize(
    "command, args",
    [
        ("generate", ["--prompt", "hi"]),
        ("generate", ["--prompt-ids", "1,2"]),
        ("bench engine", ["--baseline", "none"]),
    ],
)
def test_model_that_is_not_a_checkpoint(capsys, tmp_path, kind, command, args):
    path, why = _not_a_model(tmp_path, kind)
    code, out, err = run_main(capsys, *command.split(), *args, "--model", path)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"expertmesh {command}: ")
    assert str(path) in err and why in err and "tokenizer" not in err


@pytest.mark.parametrize("kind", ["missing", "file", "no-config"])
def test_serve_checks_the_model_before_starting_ray(capsys, tmp_path, monkeypatch, kind):
    path, why = _not_a_model(tmp_path, kind)
    monkeypatch.setitem(sys.modules, "expertmesh.cluster.cli.server", None)  # no Ray, no Serve
    code, out, err = run_main(capsys, "serve", "--model", path, "--workers", 1)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("expertmesh serve: ")
    assert str(path) in err and why in err


def test_generate_missing_model_as_a_user_runs_it(tmp_path):
    r = cli("generate", "--model", tmp_path / "nonexistent", "--prompt", "hi")
    assert r.returncode == 1 and r.stdout == ""
    assert (
        r.stderr
        == f"expertmesh generate: model directory '{tmp_path / 'nonexistent'}' does not exist\n"
    )


def test_make_tiny_readable_only_flag(capsys, tmp_path):
    small = ["--layers", 1, "--hidden", 16, "--heads", 2, "--kv-heads", 1, "--experts", 2]
    code, out, _ = run_main(capsys, "make-tiny", tmp_path / "a", *small)
    assert code == 0 and json.loads((tmp_path / "a" / "config.json").read_text())["use_bias"]
    code, out, _ = run_main(capsys, "make-tiny", tmp_path / "b", "--no-readable-only", *small)
    assert code == 0 and out.strip() == str(tmp_path / "b")
    assert not json.loads((tmp_path / "b" / "config.json").read_text())["use_bias"]


# -- ERNIE-4.5-VL ---------------------------------------------------------------------------


def test_make_tiny_vl(capsys, tmp_path, vl_checkpoint):
    """--vl writes make_tiny_vl's checkpoint: the flags given pass through, the rest keep its
    defaults (no flags: the checkpoint of make_tiny_vl(seed=0), the tests' own)."""
    code, out, err = run_main(
        capsys,
        *("make-tiny", tmp_path / "small", "--vl", "--experts", 2, "--top-k", 1, "--shared", 0),
        *("--layers", 2, "--hidden", 32, "--heads", 2, "--kv-heads", 1, "--seed", 3),
    )
    assert code == 0 and out.strip() == str(tmp_path / "small"), err
    cfg = ModelConfig.from_dir(tmp_path / "small")
    assert cfg.is_vl and (tmp_path / "small" / "preprocessor_config.json").is_file()
    experts = (cfg.num_text_experts, cfg.num_experts, cfg.top_k, cfg.num_shared_experts)
    assert experts == (2, 4, 1, 0)
    assert (cfg.num_layers, cfg.hidden_size, cfg.moe_layers) == (2, 32, (1,))
    assert (cfg.num_heads, cfg.num_kv_heads) == (2, 1)
    tok = load_tokenizer(tmp_path / "small")
    assert tok.convert_tokens_to_ids("<|IMAGE_PLACEHOLDER|>") == cfg.vision.image_token_id
    code, out, err = run_main(capsys, "make-tiny", tmp_path / "default", "--vl")
    assert code == 0, err
    for name in ("config.json", "preprocessor_config.json", "model.safetensors.index.json"):
        assert (tmp_path / "default" / name).read_text() == (vl_checkpoint / name).read_text()


def test_make_tiny_vl_refusal_writes_nothing(capsys, tmp_path):
    code, _, err = run_main(capsys, "make-tiny", tmp_path / "m", "--vl", "--shards", 1)
    assert code == 2 and "--vl does not take --shards" in err and not (tmp_path / "m").exists()


def vl_generate(capsys, model, *args) -> dict:
    code, out, err = run_main(capsys, "generate", "--model", model, "--json", *args)
    assert code == 0, err
    (line,) = out.strip().splitlines()
    return json.loads(line)


def test_generate_prompt_ids_and_two_images_matches_transformers(tmp_path, vl_checkpoint):
    """One placeholder per image in --prompt-ids, two images of different sizes, as a user
    runs it: transformers' greedy tokens; prompt_ids as given (not expanded)."""
    _, images = CASES["two-images"]
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
    ids, _ = prompt(vl_checkpoint, "two-images")
    r = cli(
        *("generate", "--model", vl_checkpoint, "--prompt-ids", ",".join(map(str, ids))),
        *("--image", tmp_path / "0.png", "--image", tmp_path / "1.png"),
        *("--max-tokens", 12, "--json", "--workers", 2),
    )
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()
    out = json.loads(line)
    assert out["token_ids"] == ref_greedy(vl_checkpoint, "two-images", 12)
    assert out["prompt_ids"] == ids
    tok = load_tokenizer(vl_checkpoint)
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)


def test_generate_chat_prompt_with_an_image(capsys, tmp_path, vl_checkpoint):
    """--prompt --chat --image: the image goes first in the user message, as transformers'
    chat template renders an image part; same tokens as transformers."""
    (messages, (im,)) = CASES["one-image"]  # [image, text] in one user message
    im.save(tmp_path / "a.png")
    text = messages[0]["content"][1]["text"]
    out = vl_generate(
        capsys, vl_checkpoint, "--prompt", text, "--chat", "--image", tmp_path / "a.png"
    )
    ids, _ = prompt(vl_checkpoint, "one-image")
    assert out["prompt_ids"] == ids
    assert out["token_ids"] == ref_greedy(vl_checkpoint, "one-image", len(out["token_ids"]))
    rendered = load_tokenizer(vl_checkpoint).decode(ids)
    assert rendered == (
        "<|begin_of_sentence|>User: Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|>"
        f"<|IMAGE_END|>{text}\nAssistant: "
    )


def test_generate_text_only_on_a_vl_model(capsys, vl_checkpoint):
    messages, _ = CASES["text"]
    out = vl_generate(capsys, vl_checkpoint, "--prompt", messages[0]["content"], "--chat")
    assert out["token_ids"] == ref_greedy(vl_checkpoint, "text", len(out["token_ids"]))


def _image_error_case(tmp_path, kind: str, vl_checkpoint, text_model):
    """(model, args, words in the error) for a bad use of --image."""
    from vl_reference import image

    image(40, 40).save(tmp_path / "ok.png")
    ids, _ = prompt(vl_checkpoint, "one-image")
    one = ["--prompt-ids", ",".join(map(str, ids))]
    if kind == "text-model":
        return (
            text_model,
            ["--prompt", "hi", "--chat", "--image", tmp_path / "ok.png"],
            (
                "takes no images",
                str(text_model),
            ),
        )
    if kind == "missing":
        return vl_checkpoint, [*one, "--image", tmp_path / "nope.png"], ("nope.png", "no such")
    if kind == "directory":
        return vl_checkpoint, [*one, "--image", tmp_path], ("is a directory",)
    if kind == "not-an-image":
        (tmp_path / "notes.png").write_text("not an image\n")
        return vl_checkpoint, [*one, "--image", tmp_path / "notes.png"], ("notes.png", "not an")
    if kind == "truncated":
        data = (tmp_path / "ok.png").read_bytes()
        (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
        return vl_checkpoint, [*one, "--image", tmp_path / "cut.png"], ("cut.png", "cannot be")
    if kind == "aspect":
        image(2, 600).save(tmp_path / "strip.png")
        return vl_checkpoint, [*one, "--image", tmp_path / "strip.png"], ("strip.png", "aspect")
    if kind == "more-images":
        extra = ["--image", tmp_path / "ok.png", "--image", tmp_path / "ok.png"]
        return vl_checkpoint, [*one, *extra], ("1 image placeholders", "2 --image files")
    if kind == "no-images":
        return vl_checkpoint, one, ("1 image placeholders", "0 --image files")
    assert kind == "plain-prompt"
    return (
        vl_checkpoint,
        ["--prompt", "hi", "--image", tmp_path / "ok.png"],
        (
            "0 image placeholders",
            "--chat",
        ),
    )


@pytest.mark.parametrize(
    "kind",
    [
        "text-model",
        "missing",
        "directory",
        "not-an-image",
        "truncated",
        "aspect",
        "more-images",
        "no-images",
        "plain-prompt",
    ],
)
def test_generate_image_errors(capsys, tmp_path, make_checkpoint, vl_checkpoint, kind):
    text_model = make_checkpoint(**CONFIGS["top2of8-shared1"])
    model, args, words = _image_error_case(tmp_path, kind, vl_checkpoint, text_model)
    code, out, err = run_main(capsys, "generate", "--model", model, *args)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("expertmesh generate: "), err
    assert all(w in err for w in words), err

"""The `expertmesh` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..config import ServeArgs, builtin_model_dir
from .args import BenchEngineArgs, GenerateArgs, TinyArgs, add_args, parse
from .bench_eplb import BenchEplbArgs
from .bench_serve import BenchServeArgs
from .bench_soak import SoakArgs
from .chat import ChatArgs, run_chat
from .local_cluster import LocalClusterArgs

log = logging.getLogger("expertmesh")


def resolve_model(model: str | None) -> Path:
    return Path(model).expanduser() if model else builtin_model_dir()


def checked_model(model: str | None) -> Path:
    """--model's directory (default: the built-in model), checked before anything starts: a
    path that does not exist, is not a directory or has no usable config.json is a one-line
    error naming it (ConfigError, reported by `main`)."""
    from expertmesh.ernie.config import ModelConfig

    path = resolve_model(model)
    ModelConfig.from_dir(path)
    return path


def cmd_make_tiny(a: TinyArgs) -> int:
    if a.vl:  # only the flags given: make_tiny_vl's own defaults for the rest
        from expertmesh.ernie.tiny_vl import make_tiny_vl

        path = make_tiny_vl(a.out_dir, **a.vl_kwargs())
    else:
        from expertmesh.ernie.tiny import make_tiny

        path = make_tiny(a.out_dir, **a.model_dump(exclude={"out_dir", "vl"}))
    print(path)
    return 0


def load_images(paths: list[str]) -> list:
    """The --image files as PIL images, decoded now: a missing or unreadable file is a one-line
    error (ValueError, reported by `main`) before any engine starts."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        try:
            with Image.open(Path(p).expanduser()) as im:
                im.load()
                images.append(im.copy())
        except FileNotFoundError:
            raise ValueError(f"--image {p!r}: no such file") from None
        except IsADirectoryError:
            raise ValueError(f"--image {p!r} is a directory, not an image file") from None
        except UnidentifiedImageError:
            raise ValueError(f"--image {p!r} is not an image file PIL can read") from None
        except Exception as e:  # truncated or corrupt data, no permission, a decompression bomb
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"--image {p!r} cannot be read as an image: {why}") from None
    return images


def image_inputs(a: GenerateArgs, model_dir: Path, model_cfg, ids: list[int]):
    """The --image files, decoded and preprocessed with the checkpoint's
    preprocessor_config.json, after checking that the model takes images and that the prompt
    has one image placeholder per image; None without images."""
    v = model_cfg.vision
    if a.images and v is None:
        raise ValueError(
            f"--image: the model at {model_dir} takes no images (not an ERNIE-4.5-VL checkpoint)"
        )
    pictures = load_images(a.images)
    found = ids.count(v.image_token_id) if v is not None else 0
    if found != len(pictures):
        hint = "; --chat puts them in the user message" if a.prompt and not a.chat else ""
        raise ValueError(
            f"the prompt has {found} image placeholders (token {v.image_token_id}) for "
            f"{len(pictures)} --image files{hint}"
        )
    if not pictures:
        return None
    from expertmesh.ernie.image import ImageInputs, ImageSettings, preprocess

    settings = ImageSettings.from_dir(model_dir)
    parts = []
    for p, im in zip(a.images, pictures, strict=True):
        try:
            parts.append(preprocess([im], settings))
        except ValueError as e:  # e.g. an aspect ratio past 200
            raise ValueError(f"--image {p!r}: {e}") from None
    return ImageInputs.concat(parts)


def prompt_ids(a: GenerateArgs, tokenizer) -> list[int]:
    if (a.prompt is None) == (a.prompt_ids is None):
        raise SystemExit("expertmesh generate: give exactly one of --prompt and --prompt-ids")
    if a.prompt_ids is not None:
        try:
            return [int(t) for t in a.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise SystemExit(
                f"expertmesh generate: --prompt-ids must be integers: {a.prompt_ids!r}"
            ) from None
    if tokenizer is None:
        raise SystemExit("expertmesh generate: the checkpoint has no tokenizer; use --prompt-ids")
    if a.chat:
        from expertmesh.ernie.tokenizer import chat_prompt_ids

        content = a.prompt  # with images: image parts first, then the text
        if a.images:
            content = [{"type": "image"}] * len(a.images) + [{"type": "text", "text": a.prompt}]
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": content}])
    return tokenizer.encode(a.prompt)


def cmd_generate(a: GenerateArgs) -> int:
    from expertmesh.ernie.config import ModelConfig
    from expertmesh.ernie.tokenizer import load_tokenizer
    from expertmesh.router.engine import RequestError
    from expertmesh.router.sampling import SamplingParams
    from expertmesh.router.structured import (
        JSON_OBJECT,
        StructuredOutputError,
        check_spec,
        schema_spec,
    )

    from .engine_factory import open_engine

    def structured_spec(text: str | None) -> str | None:
        if text is None:
            return None
        if text == "object":
            return JSON_OBJECT
        try:
            spec = schema_spec(json.loads(text))
            check_spec(spec)
        except (ValueError, StructuredOutputError) as e:
            raise SystemExit(f"expertmesh generate: --json-schema: {e}") from None
        return spec

    path = checked_model(a.model)
    tokenizer = load_tokenizer(path)
    ids = prompt_ids(a, tokenizer)
    images = image_inputs(a, path, ModelConfig.from_dir(path), ids)  # before any engine starts
    params = SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
        logprobs=a.logprobs,
        ignore_eos=a.ignore_eos,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty,
        structured=structured_spec(a.json_schema),
    )
    with open_engine(a.cluster_config(path)) as engine:
        try:
            if images is None:
                out = engine.generate([ids], params)[0]
            else:  # the engine expands each placeholder to its image's token count
                out = engine.generate([ids], params, images=[images])[0]
        except RequestError as e:
            raise SystemExit(f"expertmesh generate: {e}") from None
    text = tokenizer.decode(out.token_ids, skip_special_tokens=True) if tokenizer else ""
    if a.as_json:
        record = {
            "token_ids": out.token_ids,
            "text": text,
            "logprobs": out.logprobs,
            "finish_reason": out.finish_reason,
            "prompt_ids": ids,
        }
        if a.logprobs:
            record["top_logprobs"] = [
                [{"token_id": t, "logprob": lp} for t, lp in step] for step in out.top_logprobs
            ]
        print(json.dumps(record))
    else:
        print(text if tokenizer else " ".join(map(str, out.token_ids)))
    return 0


def cmd_bench_engine(a: BenchEngineArgs) -> int:
    from .bench_engine import bench_engine

    if a.model:  # default: a medium random checkpoint, made on the fly
        checked_model(a.model)
    bench_engine(a)
    return 0


def cmd_bench_eplb(a) -> int:
    from .bench_eplb import bench_eplb

    if a.model:  # default: a medium random checkpoint with hot experts, made on the fly
        checked_model(a.model)
    bench_eplb(a)
    return 0


def cmd_bench_soak(a) -> int:
    from .bench_soak import bench_soak

    bench_soak(a)
    return 0


def cmd_bench_serve(a: BenchServeArgs) -> int:
    from .bench_serve import bench_serve

    bench_serve(a)
    return 0


def cmd_serve(a: ServeArgs) -> int:
    if not a.address:  # a local Ray: the checkpoint must be here; checked before Ray starts
        checked_model(a.resolve_model()[0])
    from .server import run_server

    return run_server(a)


def cmd_cluster(a: LocalClusterArgs) -> int:
    from .local_cluster import run_cluster

    return run_cluster(a)


def _command(sub, name: str, help: str, args_model, run) -> None:
    """A subcommand whose flags are the fields of `args_model`."""
    p = sub.add_parser(name, help=help, description=help)
    add_args(p, args_model)
    # the subcommand's own parser reports bad values, with its own usage line
    p.set_defaults(args_model=args_model, run=run, parser=p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertmesh", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    _command(
        sub, "make-tiny", "write a small random ERNIE 4.5 MoE checkpoint", TinyArgs, cmd_make_tiny
    )
    _command(sub, "generate", "offline generation from a prompt", GenerateArgs, cmd_generate)
    _command(sub, "serve", "the OpenAI-compatible HTTP server on Ray Serve", ServeArgs, cmd_serve)
    _command(
        sub,
        "chat",
        "chat in the terminal with a running expertmesh server",
        ChatArgs,
        lambda a: run_chat(**a.model_dump()),
    )
    _command(
        sub,
        "cluster",
        "a Ray cluster of several nodes on this machine, all on 127.0.0.1: runs COMMAND on it "
        "(RAY_ADDRESS set), then stops every node",
        LocalClusterArgs,
        cmd_cluster,
    )
    bench = sub.add_parser("bench", help="benchmarks that print numbers").add_subparsers(
        dest="bench", required=True
    )
    _command(
        bench, "engine", "decode throughput against a baseline", BenchEngineArgs, cmd_bench_engine
    )
    _command(
        bench,
        "serve",
        "latency (TTFT, inter-token, end-to-end) and throughput of the HTTP API by concurrency",
        BenchServeArgs,
        cmd_bench_serve,
    )
    _command(
        bench,
        "eplb",
        "expert load balancing on a checkpoint with hot experts: per-worker load and decode "
        "throughput before and after moving the experts",
        BenchEplbArgs,
        cmd_bench_eplb,
    )
    _command(
        bench,
        "soak",
        "hold a load with disconnects and bad requests; tok/s, errors and RSS over time",
        SoakArgs,
        cmd_bench_soak,
    )
    return p


def on_loopback(address: str | None) -> bool:
    """Whether the Ray a command starts or joins lives on 127.0.0.1: a local one (no address,
    or "local"), or one at a loopback address (`expertmesh cluster`'s; "auto" means
    $RAY_ADDRESS when that is set)."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or address
    if address in (None, "local"):
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def pin_local_ray_to_loopback(ns: argparse.Namespace) -> None:
    """A Ray on this machine's loopback (a local one, or a cluster of `expertmesh cluster`)
    needs no external address: keep every Ray process, the driver included, on 127.0.0.1
    (else the driver takes the machine's address and looks for its node there). Ray reads this
    once, when it is imported, so it is set before any Ray import (the CLI imports none at
    start)."""
    address = getattr(ns, "address", None) or getattr(ns, "ray_address", None)
    if on_loopback(address) and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


# HTTP client libraries log each request at INFO ("HTTP Request: POST ..."): noise in a chat,
# a benchmark or serve's health polling. They log at WARNING unless --verbose.
CHATTY_LOGGERS = ("httpx", "httpx2", "httpcore", "openai")  # openai 2.x: httpx2


def configure_logging(command: str, verbose: bool) -> None:
    """INFO for the commands that run a model (progress, placement); the chat client writes the
    conversation to the terminal, so it logs warnings only."""
    quiet = command == "chat"
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not verbose:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    sub: argparse.ArgumentParser = ns.parser
    args = parse(sub, ns.args_model, ns)  # exits 2 with the subcommand's usage on a bad value
    pin_local_ray_to_loopback(ns)
    configure_logging(ns.command, ns.verbose)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return ns.run(args)
    except (ValueError, FileNotFoundError) as e:  # config and checkpoint errors
        print(f"{sub.prog}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

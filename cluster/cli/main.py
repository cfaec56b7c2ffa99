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
from .bench_serve import BenchServeArgs
from .bench_soak import SoakArgs
from .chat import ChatArgs, run_chat

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
    from expertmesh.ernie.tiny import make_tiny

    kw = a.model_dump(exclude={"out_dir"})
    path = make_tiny(a.out_dir, **kw)
    print(path)
    return 0


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

        return chat_prompt_ids(tokenizer, [{"role": "user", "content": a.prompt}])
    return tokenizer.encode(a.prompt)


def cmd_generate(a: GenerateArgs) -> int:
    from expertmesh.ernie.tokenizer import load_tokenizer
    from expertmesh.router.engine import RequestError
    from expertmesh.router.sampling import SamplingParams

    from .engine_factory import open_engine

    path = checked_model(a.model)
    tokenizer = load_tokenizer(path)
    ids = prompt_ids(a, tokenizer)
    params = SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
        logprobs=a.logprobs,
        ignore_eos=a.ignore_eos,
    )
    with open_engine(a.cluster_config(path)) as engine:
        try:
            out = engine.generate([ids], params)[0]
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
        "soak",
        "hold a load with disconnects and bad requests; tok/s, errors and RSS over time",
        SoakArgs,
        cmd_bench_soak,
    )
    return p


def pin_local_ray_to_loopback(ns: argparse.Namespace) -> None:
    """A local Ray (no --address, or --ray-address) needs no external address: keep every Ray
    process on 127.0.0.1. Ray reads this once, when it is imported, so it is set before any Ray
    import."""
    joins = getattr(ns, "address", None) or getattr(ns, "ray_address", None) not in (None, "local")
    if not joins and "ray" not in sys.modules:
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

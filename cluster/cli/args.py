"""Typed command-line arguments: pydantic models whose fields become argparse flags.

Each field has a default and a one-line description, which is the flag's help text. The
parsed namespace holds every flag's value (the default where it was left out) and, under
GIVEN, the flags given on the command line; `parse` hands pydantic only those, so the model's
`model_fields_set` says which flags were given (a rule can refuse a flag that does not apply).
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from ..config import ClusterConfig, Transport


class TinyArgs(BaseModel):
    out_dir: str = Field(
        description="directory to write the checkpoint to", json_schema_extra={"positional": True}
    )
    seed: int = Field(0, description="seed of the random weights")
    experts: int = Field(8, ge=1, description="routed experts per MoE layer")
    top_k: int = Field(2, ge=1, description="experts chosen per token")
    shared: int = Field(1, ge=0, description="shared experts")
    layers: int = Field(4, ge=1, description="decoder layers")
    hidden: int = Field(64, ge=8, description="hidden size")
    heads: int = Field(4, ge=1, description="attention heads")
    kv_heads: int = Field(2, ge=1, description="key/value heads")
    moe_start: int = Field(1, ge=0, description="first MoE layer index")
    moe_interval: int = Field(1, ge=1, description="MoE layer interval")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weight dtype")
    shards: int = Field(2, ge=1, description="safetensors files to split the weights over")
    readable_only: bool = Field(
        True,
        description="the model never emits a token that is not readable text on its own "
        "(partial UTF-8 bytes, control characters): an lm_head bias keeps them out",
    )
    hot_experts: int = Field(
        0,
        ge=0,
        description="experts 0..N-1 of every MoE layer are hot: --hot-bias is added to their "
        "correction bias, so they are chosen far more often (for expert load balancing)",
    )
    hot_bias: float = Field(1.0, description="what --hot-experts add to their correction bias")
    vl: bool = Field(
        False,
        description="write an ERNIE-4.5-VL checkpoint instead (make_tiny_vl: --experts text and "
        "as many vision experts, layer 0 dense, a vision tower, preprocessor_config.json); takes "
        "--seed --experts --top-k --shared --layers --hidden --heads --kv-heads, with "
        "make_tiny_vl's defaults (4 experts, 3 layers) for those not given",
    )

    @model_validator(mode="after")
    def _vl_takes(self) -> TinyArgs:
        if not self.vl:
            return self
        refused = sorted(self.model_fields_set - {"out_dir", "vl"} - set(vl_tiny_params()))
        if refused:
            flags = ", ".join(_flag(n, TinyArgs.model_fields[n]) for n in refused)
            raise ValueError(f"--vl does not take {flags} (make_tiny_vl has no such setting)")
        return self

    def vl_kwargs(self) -> dict:
        """make_tiny_vl's keyword arguments: the flags given that it takes."""
        return {n: getattr(self, n) for n in vl_tiny_params() if n in self.model_fields_set}


def vl_tiny_params() -> tuple[str, ...]:
    """The TinyArgs fields that make_tiny_vl takes (read from its signature; imports torch)."""
    import inspect

    from expertmesh.ernie.tiny_vl import make_tiny_vl

    taken = inspect.signature(make_tiny_vl).parameters
    return tuple(n for n in TinyArgs.model_fields if n in taken and n != "out_dir")


class EngineArgs(ClusterConfig):
    """A ClusterConfig whose model may be left out (the built-in one) and whose experts stay
    in-process unless a transport is chosen."""

    model: str | None = Field(
        None, description="checkpoint directory; default: the built-in tiny model"
    )
    workers: int = Field(1, ge=1, description="expert workers (shards) to split the experts over")
    transport: Transport = Field("local", description="how the gateway reaches the expert workers")

    def cluster_config(self, path: str | Path, **changes) -> ClusterConfig:
        fields = self.model_dump(include=set(ClusterConfig.model_fields))
        return ClusterConfig(**{**fields, "model": str(path), **changes})


class GenerateArgs(EngineArgs):
    prompt: str | None = Field(
        None, description="prompt text (tokenized with the checkpoint's tokenizer)"
    )
    prompt_ids: str | None = Field(
        None, description="prompt as comma-separated token ids, e.g. 1,2,3"
    )
    chat: bool = Field(False, description="wrap --prompt in the chat template as a user message")
    max_tokens: int = Field(16, ge=1, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0, description="sampling temperature; 0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=-1, description="sample from the k most likely tokens; 0 keeps all")
    seed: int | None = Field(None, description="sampling seed")
    logprobs: int | None = Field(
        None, ge=0, description="also report the K most likely tokens per step"
    )
    ignore_eos: bool = Field(False, description="do not stop at the model's EOS tokens")
    min_p: float = Field(
        0.0, ge=0, le=1, description="drop tokens less likely than min_p x the top"
    )
    repetition_penalty: float = Field(
        1.0, gt=0, description="> 1 discourages the prompt's and the output's tokens"
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="less for output tokens seen")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="less per occurrence so far")
    json_schema: str | None = Field(
        None,
        description="the answer follows this JSON schema (JSON text), or is any JSON object "
        "('object')",
    )
    images: list[str] = Field(
        [],
        description="an image file (VL models) for the prompt's next image placeholder, "
        "repeatable, in order; with --prompt --chat the images go first in the user message",
        json_schema_extra={"flag": "--image", "action": "append", "metavar": "PATH"},
    )
    as_json: bool = Field(
        False,
        description="print one JSON line: token_ids, text, logprobs",
        json_schema_extra={"flag": "--json"},
    )


class BenchEngineArgs(EngineArgs):
    transport: list[Transport] = Field(
        ["local"], description="transports to measure in one run (local = the in-process engine)"
    )
    batch: list[int] = Field([1, 16], description="batch sizes to measure")
    tokens: int = Field(32, ge=2, description="tokens to generate per sequence")
    prompt_len: int = Field(16, ge=1, description="prompt tokens per sequence")
    repeats: int = Field(3, ge=1, description="timed runs per point (the median is printed)")
    baseline: Literal["transformers", "none"] = Field(
        "transformers", description="also time transformers' generate (with a single transport)"
    )
    exchange_rows: list[int] = Field(
        [1, 8, 32], description="token rows of the measured MoE-layer exchange"
    )


def _flag(name: str, field) -> str:
    extra = field.json_schema_extra or {}
    return extra.get("flag", "--" + name.replace("_", "-"))


def _base_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def add_args(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field of `model`, with its description as help."""
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra or {}
        kind = _base_type(field.annotation)
        kw: dict = {"help": field.description}
        if "metavar" in extra:
            kw["metavar"] = extra["metavar"]
        if extra.get("action") == "append":
            kw.update(action="append", default=[])
            _record(parser.add_argument(_flag(name, field), dest=name, **kw))
            continue
        if kind is bool:  # a default of True needs a --no-... flag to be turned off
            kw["action"] = argparse.BooleanOptionalAction if field.default else "store_true"
        elif typing.get_origin(kind) is Literal:
            kw["choices"] = list(typing.get_args(kind))
        elif typing.get_origin(kind) is list:
            kw["nargs"] = "+"
            inner = typing.get_args(kind)[0]
            if typing.get_origin(inner) is Literal:
                kw["choices"] = list(typing.get_args(inner))
            else:
                kw["type"] = inner
        elif kind in (int, float, str):
            kw["type"] = kind
        if "nargs" in extra:  # e.g. "*" for a positional list that may be empty
            kw["nargs"] = extra["nargs"]
        if extra.get("positional"):
            parser.add_argument(name, **kw)
            continue
        if not field.is_required():
            kw["default"] = field.default
            if kind is not bool and field.default is not None:
                kw["help"] += f" (default: {field.default})"
        _record(parser.add_argument(_flag(name, field), dest=name, **kw))


GIVEN = "flags_given"  # the namespace attribute naming the flags given on the command line


class _Given(argparse.Action):
    """Mixed into a flag's action: notes its dest under GIVEN when the flag is given."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        setattr(namespace, GIVEN, {*getattr(namespace, GIVEN, ()), self.dest})


_GIVEN_CLASSES: dict[type, type] = {}


def _record(action: argparse.Action) -> None:
    """Make `action` (any kind: store, store_true, append, --x/--no-x) note that it was given."""
    base = type(action)
    if base not in _GIVEN_CLASSES:
        _GIVEN_CLASSES[base] = type(f"Given{base.__name__}", (_Given, base), {})
    action.__class__ = _GIVEN_CLASSES[base]


def parse(parser: argparse.ArgumentParser, model: type[BaseModel], ns: argparse.Namespace):
    """Validate parsed flags into `model`; bad values exit with a usage error. Only the flags
    given (and positionals) go in, so the fields left out take the model's defaults and
    `model_fields_set` is the set of flags given.

    `parser` is the one that defined the flags (a subcommand's), so that the usage line printed
    with the error is that command's."""
    given = getattr(ns, GIVEN, set())
    values = {
        k: v
        for k, v in vars(ns).items()
        if k in model.model_fields and (k in given or model.model_fields[k].is_required())
    }
    try:
        return model(**values)
    except ValidationError as e:
        parser.error("; ".join(_problem(model, err) for err in e.errors()))


def _problem(model: type[BaseModel], err: dict) -> str:
    """One validation error, named by its flag (a rule over several fields has none)."""
    name = str(err["loc"][0]) if err["loc"] else None
    if name in model.model_fields:
        return f"{_flag(name, model.model_fields[name])}: {err['msg']}"
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])  # a validator's own words, without "Value error, "
    return err["msg"]

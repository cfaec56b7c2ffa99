"""Structured output: a grammar masks each draw's logits, so that the answer is JSON.

OpenAI's `response_format` `json_object` (any JSON object) and `json_schema` (JSON that the
schema accepts) become a grammar compiled by xgrammar (the library vLLM and SGLang use) against
the checkpoint's tokenizer. Each request holds a matcher: before a draw it writes the bitmask of
the tokens that keep the text a prefix of some accepted answer (the model's EOS once the answer
is complete), and the token drawn advances it. A resumed request (failover) replays the tokens
it already has.

Compiling takes the tokenizer's whole vocabulary into account (tens to hundreds of ms for a real
one); compiled grammars are cached, and `Grammars.compile` may run on any thread, so the gateway
compiles before a request reaches the engine loop. xgrammar is an optional dependency
(`pip install expertmesh[structured]`); without it a structured request is refused.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from expertmesh.ernie.config import ModelConfig

JSON_OBJECT = "json_object"  # the spec of OpenAI's json_object: any JSON object


class StructuredOutputError(ValueError):
    """A spec that cannot be compiled (an invalid or unsupported schema), or no xgrammar."""


def _reason(e: Exception) -> str:
    """xgrammar's message without its log prefix ("[12:00:00] /path/file.cc:123: ")."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip())


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise StructuredOutputError(
            "structured output needs xgrammar: pip install 'expertmesh[structured]'"
        ) from None
    return xgrammar


def schema_spec(schema: dict) -> str:
    """The spec of a JSON schema: its compact text, keys in the given order (the order of the
    answer's properties)."""
    return json.dumps(schema, separators=(",", ":"))


def check_spec(spec: str) -> None:
    """StructuredOutputError if `spec` is not a grammar xgrammar can build (no tokenizer needed:
    the API checks a request with this before it reaches a gateway)."""
    xgr = _xgrammar()
    if spec == JSON_OBJECT:
        return
    try:
        xgr.Grammar.from_json_schema(spec, any_whitespace=False)
    except Exception as e:  # xgrammar raises RuntimeError / ValueError with its reason
        raise StructuredOutputError(f"unsupported JSON schema: {_reason(e)}") from None


class Matcher:
    """One request's grammar state."""

    def __init__(self, matcher, vocab: int):
        self._m = matcher
        self._mask = _xgrammar().allocate_token_bitmask(1, vocab)  # [1, ceil(V / 32)] int32

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> [V] (a new tensor) with the tokens the grammar forbids at -inf."""
        xgr = _xgrammar()
        out = logits.to(torch.float32).clone()[None]  # [1, V]
        self._m.fill_next_token_bitmask(self._mask)
        xgr.apply_token_bitmask_inplace(out, self._mask)
        return out[0].to(logits.dtype)

    def accept(self, token: int) -> bool:
        """Advance by a drawn token; False if the grammar does not allow it (nothing changes)."""
        return self._m.accept_token(token)

    @property
    def done(self) -> bool:
        """The answer is complete and its stop token was drawn."""
        return self._m.is_terminated()


class Grammars:
    """The compiler for one checkpoint's tokenizer; made on first use (the tokenizer load and
    the vocabulary's preprocessing cost nothing for a server that never sees such a request)."""

    def __init__(self, path: str | Path, model_cfg: ModelConfig):
        self.path, self.model_cfg = Path(path), model_cfg
        self._compiler = None
        self._lock = threading.Lock()

    @property
    def vocab(self) -> int:
        return self.model_cfg.vocab_size

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                from expertmesh.ernie.tokenizer import load_tokenizer

                xgr = _xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(
                    load_tokenizer(self.path),
                    vocab_size=self.vocab,
                    stop_token_ids=list(self.model_cfg.eos_token_ids),
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
            return self._compiler

    def compile(self, spec: str):
        """The compiled grammar of `spec` (cached); StructuredOutputError if it has none."""
        compiler = self._get_compiler()
        try:
            if spec == JSON_OBJECT:
                return compiler.compile_builtin_json_grammar()
            return compiler.compile_json_schema(spec, any_whitespace=False)
        except Exception as e:
            raise StructuredOutputError(f"unsupported JSON schema: {_reason(e)}") from None

    def matcher(self, spec: str, replay: Sequence[int] = ()) -> Matcher:
        """A fresh matcher for `spec`, advanced by `replay` (a resumed request's tokens)."""
        m = Matcher(_xgrammar().GrammarMatcher(self.compile(spec)), self.vocab)
        for t in replay:
            if not m.accept(t):
                raise StructuredOutputError(f"the resumed token {t} does not fit the grammar")
        return m

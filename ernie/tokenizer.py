"""The checkpoint's tokenizer and chat template, through transformers.

User text is text. Special tokens (BOS, EOS, the chat template's turn markers) come only from
the chat template: a user who writes `</s><|begin_of_sentence|>` gets those characters, not
those tokens, so no one can forge a turn. `encode_text` and `chat_prompt_ids` take transformers'
plain path whenever the user's text holds no special-token string, so ordinary prompts get
exactly the ids of `tokenizer.encode(...)` / `apply_chat_template(...)`; only text that holds
one is encoded as transformers' `split_special_tokens=True` does. "Special" means the added
tokens marked special (and the named ones: bos, eos, unk, ...); other added tokens are ordinary
vocabulary, in user text as in the template. (Recent transformers have
`apply_chat_template(..., sanitize_control_tokens=True)` for the same end; it is not used here:
the pin is `transformers>=5.0`, and it encodes each neutralised token apart from its
neighbours, where this module encodes the user's text as one text.)
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def load_tokenizer(path: str | Path):
    """transformers' tokenizer from the checkpoint directory, or None if it has none."""
    path = Path(path)
    if not any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# -- special tokens ---------------------------------------------------------------------------


class Specials:
    """A tokenizer's special tokens (the added tokens marked special, and the named ones), and
    how to encode text with them split into characters.

    Thread-safe (the ingress tokenizes in worker threads): transformers implements
    `split_special_tokens=True` by flipping a flag on the Rust tokenizer it shares between
    calls, so a concurrent call could see the other's setting: a forged `</s>` would become the
    token, or a template's own specials text. Text is therefore encoded by a private copy of
    the Rust tokenizer with the flag set once; when that copy does not give transformers' ids
    (checked on a probe), both paths go through transformers under a lock.
    """

    _locked = False  # encode through transformers under the lock (see above)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        added = tokenizer.added_tokens_decoder.values()
        strings = {t.content for t in added if t.special} | set(tokenizer.all_special_tokens)
        self.strings = tuple(sorted(filter(None, strings), key=len, reverse=True))
        ids = tokenizer.convert_tokens_to_ids(list(self.strings))
        self.ids = frozenset(ids) | frozenset(tokenizer.all_special_ids)
        # longest first, so a token wins over the tokens it contains
        alternatives = "|".join(map(re.escape, self.strings))
        self.pattern = re.compile(alternatives) if self.strings else None
        self._text = self._text_tokenizer()

    def _text_tokenizer(self):
        """A copy of the Rust tokenizer that encodes special-token strings as text, or None."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a Python tokenizer: split_special_tokens is a plain argument
            return None
        from tokenizers import Tokenizer

        text = Tokenizer.from_str(backend.to_str())
        text.encode_special_tokens = True
        text.no_truncation()
        text.no_padding()
        probe = "Hello there,\n  你好 🙂 x"
        for add in (False, True):
            if text.encode(probe, add_special_tokens=add).ids != self.encode(probe, add):
                log.warning("a copy of the Rust tokenizer encodes differently; using a lock")
                self._locked = True
                return None
        return text

    def found_in(self, text: str) -> bool:
        return self.pattern is not None and self.pattern.search(text) is not None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """transformers' `tokenizer.encode`: special-token strings become special tokens."""
        if self._locked:
            with self._lock:
                return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def plain(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """`text` with every special-token string in it encoded as its characters."""
        if self._text is not None:
            return self._text.encode(text, add_special_tokens=add_special_tokens).ids
        with self._lock:
            out = self.tokenizer(
                text, add_special_tokens=add_special_tokens, split_special_tokens=True
            )
        return list(out["input_ids"])

    @cached_property
    def after_special(self) -> Callable[[str], list[int]]:
        """How to encode text that follows a special token with the ids it gets there.

        SentencePiece-style tokenizers add a prefix space to the start of a text only, so text
        that follows a token inside a longer text is encoded after a newline that is then
        removed; byte-level ones need nothing. Which one this tokenizer needs is measured.
        """
        newline = self.plain("\n")

        def after_newline(text: str) -> list[int]:
            ids = self.plain("\n" + text)
            return ids[len(newline) :] if ids[: len(newline)] == newline else self.plain(text)

        token = self.strings[-1]
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        probes = ("User: hi", " a b", "\nx", "你好")
        for encode in (self.plain, after_newline):
            if all(self.encode(token + p, False) == [token_id, *encode(p)] for p in probes):
                return encode
        log.warning("cannot reproduce how this tokenizer encodes text after a special token")
        return self.plain


_SPECIALS: dict[int, Specials] = {}


def specials(tokenizer) -> Specials:
    """The `Specials` of `tokenizer`, computed once per tokenizer object."""
    s = _SPECIALS.get(id(tokenizer))
    if s is None or s.tokenizer is not tokenizer:
        if len(_SPECIALS) >= 8:
            _SPECIALS.clear()
        s = _SPECIALS[id(tokenizer)] = Specials(tokenizer)
    return s


# -- encoding user text -----------------------------------------------------------------------


def encode_text(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text` as text: a special-token string in it is encoded as its characters.

    `add_special_tokens` adds what the tokenizer adds to every input (a BOS where it is
    configured to), as `tokenizer.encode` does. Text without special-token strings gets exactly
    `tokenizer.encode(text)`.
    """
    s = specials(tokenizer)
    if not s.found_in(text):
        return s.encode(text, add_special_tokens)
    return s.plain(text, add_special_tokens)


def chat_prompt_ids(
    tokenizer, messages: list[dict], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of `messages` rendered with the checkpoint's chat template.

    The template writes the special tokens; the messages' text is encoded as text. When no
    message holds a special-token string these are the ids of transformers'
    `apply_chat_template(messages, tokenize=True)`, else those of `safe_chat_prompt_ids`.
    """
    s = specials(tokenizer)
    if any(s.found_in(x) for x in _strings(messages)):
        return safe_chat_prompt_ids(tokenizer, messages, add_generation_prompt)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return s.encode(text, add_special_tokens=False)


_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters around a placeholder


def safe_chat_prompt_ids(
    tokenizer, messages: list[dict], add_generation_prompt: bool = True
) -> list[int]:
    """`chat_prompt_ids` where special-token strings in the messages are encoded as text.

    Each special-token string in a message is replaced by a placeholder (with a random nonce
    the user cannot guess) and the conversation rendered; the rendered text is split at the
    special tokens the template wrote; each piece between them gets its placeholders back and
    is encoded with special tokens split into characters. For messages without special-token
    strings this gives the same ids as the plain path. Raises ValueError when the template
    mangled a placeholder.
    """
    s = specials(tokenizer)
    nonce, found = secrets.token_hex(8), []

    def hide(m: re.Match) -> str:
        found.append(m.group(0))
        return f"{_OPEN}{nonce}:{len(found) - 1}{_CLOSE}"

    marked = _map_strings(messages, lambda x: s.pattern.sub(hide, x) if s.pattern else x)
    rendered = tokenizer.apply_chat_template(
        marked, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    placeholder = re.compile(f"{_OPEN}{nonce}:(\\d+){_CLOSE}")
    pieces = re.split(f"({s.pattern.pattern})", rendered) if s.pattern else [rendered]
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2:  # a special token the template wrote
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            text = placeholder.sub(lambda m: found[int(m.group(1))], piece)
            if nonce in text:
                raise ValueError("the chat template altered the text of the messages")
            ids += s.plain(text) if i == 0 else s.after_special(text)
    return ids


def _strings(obj: Any):
    """Every string value in nested dicts and lists (dict keys left out)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def _map_strings(obj: Any, fn: Callable[[str], str]) -> Any:
    """`obj` with `fn` applied to every string value in nested dicts and lists."""
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_map_strings(v, fn) for v in obj]
    return obj

"""Incremental detokenization of one generated choice, with stop strings.

`TextStream` turns the engine's token ids into text as they arrive. It never releases half a
character: with byte-level BPE (and SentencePiece byte fallback) one UTF-8 character can span
several tokens, and a decode that ends in U+FFFD is held until the character completes. Stop
strings cut the text before their first occurrence; a tail that could still grow into a stop
string is held until it is clear either way. Text is released token by token, so each released
token's text is exactly the text released with it (its logprob goes out in the same chunk).

The invariant: once finished, `text` == `tokenizer.decode(ids, skip_special_tokens=True)` cut
before the first stop string, where `ids` are the pushed tokens minus the stop tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

INCOMPLETE = "\ufffd"  # what a decode shows for bytes that are not (yet) a whole character


@dataclass
class TokenInfo:
    """One generated token as released: where its text starts, and what the engine said of it."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # [(token_id, logprob)], most likely first
    routed_experts: list[list[int]] | None = None  # [moe_layers][k]
    offset: int = 0  # index in the choice's text where this token's text starts


@dataclass
class Delta:
    text: str = ""  # newly released text
    tokens: list[TokenInfo] = field(default_factory=list)  # the tokens that text came from
    stopped: bool = False  # a stop string was hit: the text is complete, stop generating


@dataclass
class _Pending:
    info: TokenInfo
    end: int | None = None  # where its text ends, once its characters are complete


class TextStream:
    """Detokenizes one choice; `push` each engine token, then `finish` (unless `stopped`)."""

    def __init__(
        self, tokenizer, stop: Sequence[str] = (), stop_token_ids: Iterable[int] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stop_token_ids = frozenset(stop_token_ids)
        self.num_tokens = 0  # every pushed token, stop tokens and those after a stop string too
        self.stopped = False  # ended by a stop string
        self.finished = False
        self.tokens: list[TokenInfo] = []  # every released token
        self._ids: list[int] = []  # pushed tokens minus stop tokens
        self._prefix, self._read = 0, 0  # decode window: ids[_prefix:_read] is decoded text
        self._decoded = ""  # text of the complete characters decoded so far
        self._released = 0  # chars of _decoded released
        self._scan_from = 0  # no stop string starts before this index
        self._pending: list[_Pending] = []

    @property
    def text(self) -> str:
        """The text released so far (all of it once finished)."""
        return self._decoded[: self._released]

    def push(
        self,
        token_id: int,
        logprob: float | None = None,
        top_logprobs: Sequence[Sequence] | None = None,
        routed_experts: list[list[int]] | None = None,
    ) -> Delta:
        self.num_tokens += 1
        if self.finished:
            return Delta(stopped=self.stopped)
        if token_id in self.stop_token_ids:
            return Delta()  # EOS and friends end the text; they have none
        top = [(int(t), float(lp)) for t, lp in top_logprobs] if top_logprobs else top_logprobs
        info = TokenInfo(int(token_id), logprob, top, routed_experts, len(self._decoded))
        self._ids.append(int(token_id))
        self._pending.append(_Pending(info))
        self._decode(final=False)
        return self._after_decode(final=False)

    def push_event(self, ev) -> Delta:
        """`push` from an engine `TokenEvent`."""
        if ev.token_id is None:
            return Delta(stopped=self.stopped)
        return self.push(ev.token_id, ev.logprob, ev.top_logprobs, ev.routed_experts)

    def finish(self) -> Delta:
        """Generation ended: flush the held text (an incomplete character decodes as U+FFFD)."""
        if self.finished:
            return Delta(stopped=self.stopped)
        self._decode(final=True)
        delta = self._after_decode(final=True)
        self.finished = True
        return delta

    # -- decoding ---------------------------------------------------------------------------

    def _decode(self, final: bool) -> None:
        """Decode the window's new tokens into _decoded, unless they end mid-character."""
        prefix = self._decode_ids(self._ids[self._prefix : self._read])
        full = self._decode_ids(self._ids[self._prefix :])
        if full.endswith(INCOMPLETE) and not final:
            return  # wait for the rest of the character
        new = full[len(prefix) :]
        if new:
            self._decoded += new
            self._prefix, self._read = self._read, len(self._ids)
        for p in self._pending:
            if p.end is None:
                p.end = len(self._decoded)

    def _decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    # -- stop strings and release -----------------------------------------------------------

    def _after_decode(self, final: bool) -> Delta:
        cut = self._find_stop()
        if cut is not None:
            return self._stop_at(cut)
        limit = len(self._decoded) if final else len(self._decoded) - self._stop_prefix_len()
        return self._release(limit, final)

    def _find_stop(self) -> int | None:
        """Index of the earliest stop string in the decoded text, if any."""
        if not self.stop:
            return None
        hits = [i for s in self.stop if (i := self._decoded.find(s, self._scan_from)) >= 0]
        longest = max(len(s) for s in self.stop)
        self._scan_from = max(self._scan_from, len(self._decoded) - longest + 1)
        return min(hits) if hits else None

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that a stop string starts with."""
        text, best = self._decoded, 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text) - self._released), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, limit: int, final: bool) -> Delta:
        """Release whole tokens whose text ends by `limit` (all of them when final)."""
        n, end = 0, self._released
        for p in self._pending:
            if p.end is None or (p.end > limit and not final):
                break
            n, end = n + 1, p.end
        return self._emit(n, end, stopped=False)

    def _stop_at(self, cut: int) -> Delta:
        """Release the text before `cut` and the tokens that contributed to it; drop the rest."""
        n = sum(1 for p in self._pending if p.info.offset < cut)
        self.stopped = self.finished = True
        return self._emit(n, cut, stopped=True)

    def _emit(self, n: int, end: int, stopped: bool) -> Delta:
        released = [p.info for p in self._pending[:n]]
        del self._pending[:n]
        text = self._decoded[self._released : end]
        self._released = max(self._released, end)
        self.tokens.extend(released)
        return Delta(text, released, stopped)


# -- token strings for logprobs ---------------------------------------------------------------

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte (the inverse of `bytes_to_unicode`)."""
    visible = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in visible:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The raw bytes of one token (may be part of a UTF-8 character); b"" if unknown."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not piece:
        return b""
    if _is_byte_level(tokenizer):
        table = _byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    if m := _BYTE_FALLBACK.fullmatch(piece):
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


def token_text(tokenizer, token_id: int) -> str:
    """A token as a string for logprobs; bytes that are not whole characters as \\xNN escapes."""
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="backslashreplace")

"""Incremental detokenization of one generated choice, with stop strings.

`TextStream` turns the engine's token ids into text as they arrive. It never releases half a
character: with byte-level BPE (and SentencePiece byte fallback) one UTF-8 character can span
several tokens, and a decode that ends in U+FFFD holds back only the tokens from the last
character boundary on, and only while their bytes end in the first bytes of a character that
later tokens can still complete: at most 3 bytes (a UTF-8 character has at most 4), so at most
3 tokens with bytes (more only when tokens straddle characters: a token that ends one and
starts the next waits with the one it starts). Bytes that can no longer become a character are
released at once as the U+FFFD the final decode shows, so broken bytes stream token by token.
Stop strings cut the text before their first occurrence; a tail that could still grow into a
stop string is held until it is clear either way. Text is released token by token, so each
released token's text is exactly the text released with it (its logprob goes out in the same
chunk).

The invariant: once finished, `text` == `tokenizer.decode(ids, skip_special_tokens=True)` cut
before the first stop string, where `ids` are the pushed tokens minus the stop tokens.
Without a tokenizer (a checkpoint served on token ids alone) there is no text: every token is
released as it comes, with an empty text, and there are no stop strings.

One entry per counted token: every token pushed before the stream finished is counted in
`num_tokens` and, once finished, is in `tokens` (hence has a logprob entry): the tokens of the
text, a stop token (the model's EOS: no text), and the tokens that made up a stop string (no
text; their offset is the end of the text). Usage reports `num_tokens`, so usage and logprobs
agree. Tokens pushed after a stop string ended the stream are ignored and not counted.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from expertmesh.ernie.tokenizer import specials

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
    upto: int  # its text is complete once this many ids are decoded
    end: int | None = None  # where its text ends, once its characters are complete
    textless: bool = False  # a stop token: no text, starts where the text before it ends


class TextStream:
    """Detokenizes one choice; `push` each engine token, then `finish` (unless `stopped`)."""

    def __init__(
        self,
        tokenizer,
        stop: Sequence[str] = (),
        stop_token_ids: Iterable[int] = (),
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.min_tokens = min_tokens  # stop strings count only once more tokens than this are out
        self.stop_token_ids = frozenset(stop_token_ids)
        self.num_tokens = 0  # tokens pushed before the stream finished, stop tokens included
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
        if self.finished:
            return Delta(stopped=self.stopped)
        self.num_tokens += 1
        top = [(int(t), float(lp)) for t, lp in top_logprobs] if top_logprobs else top_logprobs
        info = TokenInfo(int(token_id), logprob, top, routed_experts, len(self._decoded))
        textless = token_id in self.stop_token_ids  # EOS and friends end the text; no text
        if not textless:
            self._ids.append(int(token_id))
        self._pending.append(_Pending(info, len(self._ids), textless=textless))
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
        """Decode the window's new tokens into _decoded, but for a character still incomplete."""
        n = len(self._ids)
        text = self._decode_ids(self._ids[self._prefix :])
        if text.endswith(INCOMPLETE) and not final:
            n = self._decodable()
            if n < len(self._ids):
                text = self._decode_ids(self._ids[self._prefix : n])
        prefix = self._decode_ids(self._ids[self._prefix : self._read])
        new = text[len(prefix) :]
        if new:
            self._decoded += new
            self._prefix, self._read = self._read, n
        for p in self._pending:
            if p.end is None and p.upto <= n:
                p.end = len(self._decoded)
                if p.textless:
                    p.info.offset = p.end

    def _decode_ids(self, ids: list[int]) -> str:
        if not ids or self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decodable(self) -> int:
        """How many ids decode for good now: up to the last token boundary that no character
        straddles (special tokens, which the decode skips, have no bytes). The tokens after it
        hold the first bytes of a character that later tokens can still complete."""
        skipped = specials(self.tokenizer).ids
        held = [b"" if t in skipped else self._bytes(t) for t in self._ids[self._read :]]
        data, n, pos = b"".join(held), self._read, 0
        for i, b in enumerate(held):
            pos += len(b)
            if _char_boundary(data, pos):
                n = self._read + i + 1
        return n

    def _bytes(self, token_id: int) -> bytes:
        return token_bytes(self.tokenizer, token_id)

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
        longest = max(len(s) for s in self.stop)
        hits = []
        if self.num_tokens > self.min_tokens:  # as vLLM: only text ending past them is searched
            hits = [i for s in self.stop if (i := self._decoded.find(s, self._scan_from)) >= 0]
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
        """Release the text before `cut` and every held token: those of the stop string too
        (they were generated and are counted), with offsets no further than `cut`."""
        for p in self._pending:
            p.info.offset = min(p.info.offset, cut)
        self.stopped = self.finished = True
        return self._emit(len(self._pending), cut, stopped=True)

    def _emit(self, n: int, end: int, stopped: bool) -> Delta:
        released = [p.info for p in self._pending[:n]]
        del self._pending[:n]
        text = self._decoded[self._released : end]
        self._released = max(self._released, end)
        self.tokens.extend(released)
        return Delta(text, released, stopped)


def _char_boundary(data: bytes, pos: int) -> bool:
    """Whether no character of `data`'s UTF-8 decode (U+FFFD for bad bytes) straddles `pos`."""
    _, used = codecs.utf_8_decode(data[:pos], "replace", False)  # stops before a valid tail
    if used == pos:
        return True
    if pos == len(data):
        return False  # the tail may still become a character
    try:  # the next byte either continues the tail or ends it as U+FFFD right at `pos`
        codecs.utf_8_decode(data[used : pos + 1], "strict", False)
    except UnicodeDecodeError:
        return True
    return False


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
    """A token as a string for logprobs; bytes that are not whole characters as \\xNN escapes.
    Without a tokenizer: "token_id:<id>" (vLLM's `return_tokens_as_token_ids` form)."""
    if tokenizer is None:
        return f"token_id:{int(token_id)}"
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="backslashreplace")

"""The tcp transport's wire: one frame per exchange, a fixed header and the tensors' raw bytes.

Why not gRPC for this: a decode step makes one exchange per MoE layer per worker, each a
few KB, and through Python's gRPC each message hops between several threads on both sides
(the call's request-consumer thread, the server's poller and handler threads). Measured on
this 2-core machine, one MoE-layer exchange with two worker processes (medium checkpoint):
~1.5-1.8 ms at 1 row and ~3.3-3.8 ms at 8 rows over gRPC streams, ~1.0 and ~2.4-3.1 ms with
these frames on a plain TCP socket, where the thread that needs the answer sends and reads it
itself. The
workers still serve gRPC only with `--transport grpc`; these frames are the `tcp` transport.

A frame (little-endian, as `wire.py`): a 32-byte header, then `length` bytes of payload.

    magic "EMX1" | kind u8 | dtype u8 | weights dtype u8 | pad | layer i32 | n i32 | k i32 |
    hidden i32 | length u64

- REQUEST: payload x [n, hidden] (dtype), expert_ids [n, k] int64, weights [n, k] (weights
  dtype), in that order, each starting at a multiple of 8 bytes (zero padding between), so
  each is viewed in place with its dtype.
- REPLY: payload y [n, hidden] (dtype); k = 0.
- ERROR: payload a UTF-8 message (the worker refused or failed the request; the stream stays
  usable, frames stay aligned).

Dtype codes are `COMPUTE_DTYPES` indices. A reader checks the header against the payload's
length before it allocates anything, so a bad frame costs one header.
"""

from __future__ import annotations

import socket
import struct
import sys
from dataclasses import dataclass
from enum import IntEnum

import torch
from expertmesh.ernie.devices import dtype_code, dtype_of_code

if sys.byteorder != "little":
    raise ImportError("expertmesh.workers.frames supports little-endian hosts only")

MAGIC = b"EMX1"
HEADER = struct.Struct("<4sBBBxiiiiQ")  # 32 bytes
MAX_PAYLOAD = 2**31 - 1  # as gRPC's message cap here (wire.py): bounds what a header can ask for
_JOIN_BELOW = 256 * 1024  # smaller frames go out in one send (one segment with TCP_NODELAY)
_PAD = memoryview(bytes(8))


class Kind(IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3


class FrameError(ValueError):
    """A frame that does not parse: the stream cannot be trusted after it."""


@dataclass
class Frame:
    kind: Kind
    layer: int
    n: int
    k: int
    hidden: int
    dtype: int
    weights_dtype: int
    payload: torch.Tensor  # [length] uint8


def _align(n: int) -> int:
    return -(-n // 8) * 8


def request_layout(n: int, k: int, h: int, size: int, wsize: int) -> tuple[int, int, int]:
    """Offsets of expert_ids and weights in a REQUEST's payload, and its length."""
    ids_at = _align(n * h * size)
    w_at = ids_at + _align(n * k * 8)
    return ids_at, w_at, w_at + n * k * wsize


def _raw(t: torch.Tensor) -> memoryview:
    """t's bytes, on CPU and contiguous (via uint8: numpy has no bfloat16)."""
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def _send(sock: socket.socket, header: bytes, parts: list[memoryview]) -> None:
    total = sum(len(p) for p in parts)
    if total < _JOIN_BELOW:
        sock.sendall(header + b"".join(parts))
    else:
        sock.sendall(header)
        for p in parts:
            sock.sendall(p)


def send_request(sock, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """x: [n, H]; ids: [n, k] global expert ids (-1: elsewhere); weights: [n, k]."""
    n, h = x.shape
    k = ids.shape[1]
    xs, idss = _raw(x), _raw(ids.to(torch.int64))
    parts = [xs, _PAD[: -len(xs) % 8], idss, _PAD[: -len(idss) % 8], _raw(weights)]
    header = HEADER.pack(
        MAGIC,
        Kind.REQUEST,
        dtype_code(x.dtype),
        dtype_code(weights.dtype),
        layer,
        n,
        k,
        h,
        sum(len(p) for p in parts),
    )
    _send(sock, header, parts)


def send_reply(sock, layer: int, y: torch.Tensor) -> None:
    """y: [n, H]."""
    n, h = y.shape
    raw = _raw(y)
    code = dtype_code(y.dtype)
    _send(sock, HEADER.pack(MAGIC, Kind.REPLY, code, code, layer, n, 0, h, len(raw)), [raw])


def send_error(sock, layer: int, message: str) -> None:
    raw = message.encode("utf-8", "replace")[:65536]
    _send(sock, HEADER.pack(MAGIC, Kind.ERROR, 0, 0, layer, 0, 0, 0, len(raw)), [memoryview(raw)])


def _read_into(sock: socket.socket, view: memoryview) -> bool:
    """Fill view; False if the stream ended before the first byte, EOFError if mid-way."""
    got = 0
    while got < len(view):
        r = sock.recv_into(view[got:])
        if r == 0:
            if got == 0:
                return False
            raise EOFError(f"the stream ended {len(view) - got} bytes short of a frame")
        got += r
    return True


def read_frame(sock: socket.socket) -> Frame | None:
    """The next frame, or None if the peer closed the stream between frames.

    Raises FrameError on a malformed header, EOFError if the stream ends inside a frame,
    and whatever the socket raises (a timeout: socket.timeout)."""
    head = bytearray(HEADER.size)
    if not _read_into(sock, memoryview(head)):
        return None
    magic, kind, dt, wdt, layer, n, k, h, length = HEADER.unpack(head)
    if magic != MAGIC:
        raise FrameError(f"not a frame (magic {bytes(magic)!r})")
    try:
        kind = Kind(kind)
        sizes = dtype_of_code(dt).itemsize, dtype_of_code(wdt).itemsize
    except (ValueError, IndexError) as e:
        raise FrameError(f"bad frame header: {e}") from None
    if min(n, k, h) < 0 or length > MAX_PAYLOAD:
        raise FrameError(f"bad frame header: n={n} k={k} hidden={h} length={length}")
    want = {
        Kind.REQUEST: request_layout(n, k, h, *sizes)[2],
        Kind.REPLY: n * h * sizes[0],
    }.get(kind, length)
    if length != want:
        raise FrameError(f"{kind.name} of n={n} k={k} hidden={h} needs {want} bytes, not {length}")
    # torch.empty, not bytearray: no zero-fill, and the tensors made from it own it
    buf = torch.empty(length, dtype=torch.uint8)
    if length and not _read_into(sock, memoryview(buf.numpy()).cast("B")):
        raise EOFError("the stream ended between a frame's header and its payload")
    return Frame(kind, layer, n, k, h, dt, wdt, buf)


def request_tensors(f: Frame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, H], expert_ids [n, k] int64, weights [n, k] of a REQUEST frame (no copies)."""
    buf, n, k, h = f.payload, f.n, f.k, f.hidden
    dt, wdt = dtype_of_code(f.dtype), dtype_of_code(f.weights_dtype)
    ids_at, w_at, _ = request_layout(n, k, h, dt.itemsize, wdt.itemsize)
    x = buf[: n * h * dt.itemsize].view(dt).view(n, h)
    ids = buf[ids_at : ids_at + n * k * 8].view(torch.int64).view(n, k)
    weights = buf[w_at:].view(wdt).view(n, k)
    return x, ids, weights


def reply_tensor(f: Frame) -> torch.Tensor:
    """y [n, H] of a REPLY frame."""
    return f.payload.view(dtype_of_code(f.dtype)).view(f.n, f.hidden)


def error_text(f: Frame) -> str:
    return bytes(f.payload.numpy()).decode("utf-8", "replace")

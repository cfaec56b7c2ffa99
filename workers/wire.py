"""Tensors on the wire: `expert_pb2.Tensor` <-> torch.Tensor, raw little-endian bytes, no pickle.

Sending copies the tensor's bytes once (protobuf wants `bytes`); receiving wraps the bytes
protobuf hands out with `torch.frombuffer`, without a copy. Each access to `msg.data` gives a
fresh `bytes` object that only the returned tensor holds, so writing into that tensor harms
no one; torch's one-time "buffer is not writable" warning is therefore used up at import.
"""

from __future__ import annotations

import sys
import warnings

import torch
from expertmesh.ernie.devices import DTYPES, dtype_name
from expertmesh.proto import expert_pb2

if sys.byteorder != "little":  # the wire format is little-endian and bytes are sent as-is
    raise ImportError("expertmesh.workers.wire supports little-endian hosts only")


MAX_MESSAGE_BYTES = 2**31 - 1  # a prefill's rows can be hundreds of MB; protobuf caps at 2 GiB
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
CHANNEL_OPTIONS = [
    *SERVER_OPTIONS,
    ("grpc.enable_http_proxy", 0),  # connect to the given address, never via an http(s)_proxy
]

# torch warns once per process when it wraps a read-only buffer; spend that warning here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)


def tensor_to_proto(t: torch.Tensor) -> expert_pb2.Tensor:
    """Any supported dtype, any shape (empty and 0-d included); moves to CPU if needed."""
    name = dtype_name(t.dtype)
    if name not in DTYPES:
        raise TypeError(f"dtype {t.dtype} cannot go on the wire")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has none; the same bytes as int16
        t = t.view(torch.int16)
    return expert_pb2.Tensor(data=t.numpy().tobytes(), dtype=name, shape=t.shape)


def tensor_from_proto(msg: expert_pb2.Tensor) -> torch.Tensor:
    """The tensor `msg` describes, on CPU; raises ValueError on a malformed message."""
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"unknown wire dtype {msg.dtype!r}")
    shape = tuple(msg.shape)
    numel = 1
    for n in shape:
        numel *= n
    data = msg.data
    if len(data) != numel * dtype.itemsize:
        raise ValueError(
            f"tensor of shape {list(shape)} {msg.dtype} needs {numel * dtype.itemsize} bytes, "
            f"got {len(data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)

"""Dtypes and devices by name: the one table the gateway, the workers and the wires share.

Configs name dtypes as strings ("bfloat16"); the gRPC wire names tensor dtypes the same way and
the collective wire sends a small integer code. "auto" choices (device, compute dtype) are
resolved here, once, so a gateway and its workers cannot disagree.
"""

from __future__ import annotations

import torch

# every dtype a tensor may have on a wire, by name
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # what a model may compute in; code = index


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A compute dtype from its name ("bfloat16", "torch.bfloat16") or itself."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in COMPUTE_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(COMPUTE_DTYPES)}")
    return DTYPES[key]


def dtype_code(dtype: torch.dtype) -> int:
    """The collective wire's code of a compute dtype."""
    return COMPUTE_DTYPES.index(dtype_name(dtype))


def dtype_of_code(code: int) -> torch.dtype:
    return DTYPES[COMPUTE_DTYPES[code]]


def resolve_device(requested: str, gpu_assigned: bool = True) -> str:
    """ "cuda" or "cpu" for a requested device; "auto" is cuda when this process may use a GPU
    (`gpu_assigned`: Ray gave it one, or it runs outside Ray) and CUDA is there."""
    if requested != "auto":
        return requested
    return "cuda" if gpu_assigned and torch.cuda.is_available() else "cpu"


def compute_dtype(requested: str, device: str, checkpoint_dtype: str) -> torch.dtype:
    """The dtype to compute in: as requested; "auto" is float32 on CPU, the checkpoint's on GPU."""
    if requested != "auto":
        return parse_dtype(requested)
    if torch.device(device).type == "cpu":
        return torch.float32
    return parse_dtype(checkpoint_dtype)

"""Lazy reading of a checkpoint in the Hugging Face Hub layout of ERNIE 4.5 MoE.

One `model.safetensors`, or shards listed in `model.safetensors.index.json`. Tensors are
read one by one by name, so an expert shard touches only its own experts' bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig


class CheckpointError(ValueError):
    """A tensor is missing or has the wrong shape, or the checkpoint files are unreadable."""


class CheckpointReader:
    """Reads single tensors by name; counts what it read (`tensors_read`, `bytes_read`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._key_to_file = self._index()
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self.tensors_read: list[str] = []
        self.bytes_read = 0

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: v for k, v in weight_map.items() if not _ignored(k)}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {str(self.path)!r}")
        mapping = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                mapping.update({k: f.name for k in h.keys() if not _ignored(k)})
        return mapping

    def keys(self) -> Iterable[str]:
        return self._key_to_file.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def _handle(self, fname: str):
        if fname not in self._handles:
            f = self.path / fname
            if not f.is_file():
                raise CheckpointError(f"shard {fname!r} named in the index is missing")
            self._handles[fname] = self._stack.enter_context(safe_open(f, framework="pt"))
        return self._handles[fname]

    def read(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The tensor `key`, checked against `shape`, cast to `dtype` if given."""
        missing = CheckpointError(
            f"checkpoint {str(self.path)!r} lacks tensor {key!r} (expected shape {list(shape)})"
        )
        if key not in self._key_to_file:
            raise missing
        handle = self._handle(self._key_to_file[key])
        if key not in handle.keys():  # the index names it, the file does not hold it
            raise missing
        t = handle.get_tensor(key)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {key!r} has shape {list(t.shape)}, expected {list(shape)}"
            )
        self.tensors_read.append(key)
        self.bytes_read += t.numel() * t.element_size()
        return t.to(dtype) if dtype is not None else t

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


MTP_PREFIXES = ("model.mtp", "mtp")


def _ignored(key: str) -> bool:
    """Multi-token-prediction tensors, not used for inference: the Hub's `model.mtp_block.*`,
    `model.mtp_emb_norm.*`, `model.mtp_hidden_norm.*`, `model.mtp_linear_proj.*`, and
    `mtp*` at the top level (as older checkpoints wrote them)."""
    return key.startswith(MTP_PREFIXES)


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}"


def expert_keys(cfg: ModelConfig, layer: int, expert: int) -> dict[str, tuple[int, int]]:
    """Keys and shapes of one routed expert's SwiGLU weights in the Hub layout.

    VL checkpoints keep one list of 2E experts per layer: `expert` is its index there, and
    vision experts (E..2E-1) have their own width."""
    h, inter = cfg.hidden_size, cfg.expert_width(expert)
    p = f"{layer_prefix(layer)}.mlp.experts.{expert}"
    return {
        f"{p}.gate_proj.weight": (inter, h),
        f"{p}.up_proj.weight": (inter, h),
        f"{p}.down_proj.weight": (h, inter),
    }

"""Build an engine for the chosen transport: in-process shards, or expert workers on Ray."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from expertmesh.router.engine import EngineConfig, LLMEngine

from .args import EngineArgs


def engine_config(a: EngineArgs) -> EngineConfig:
    return EngineConfig(dtype=a.dtype, device=a.device)


@contextmanager
def open_engine(path: Path, a: EngineArgs) -> Iterator[LLMEngine]:
    """An engine over `a.workers` expert shards reached by `a.transport`; closed on exit."""
    if a.transport != "local":
        raise ValueError(f"transport {a.transport!r} is not available yet")
    engine = LLMEngine.from_checkpoint(path, engine_config(a), num_shards=a.workers)
    try:
        yield engine
    finally:
        engine.close()

"""The GPU benchmark's code path, on tiny shapes on the CPU (its numbers come from a GPU)."""

from __future__ import annotations

import pytest
from expertmesh.cluster.cli.bench_gpu import main

pytestmark = pytest.mark.slow


def test_bench_gpu_runs_on_tiny_shapes(capsys):
    rows = main(
        ["--tiny", "--device", "cpu", "--batch", "1", "2", "--steps", "2"]
        + ["--warmup", "1", "--profile-steps", "1"]
    )
    out = capsys.readouterr().out
    assert [r["batch"] for r in rows] == [1, 2]
    assert "Decode step vs the HBM roofline" in out and "CUDA graphs" in out

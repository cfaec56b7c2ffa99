"""The native kernels built for narrower vector units than this machine's, against the same
references as their own tests.

Why: `ernie/simd.h` has three forms of its 16-lane vector (one AVX-512 register, two AVX2
registers, four SSE registers), chosen by the compiler's target. CI builds only the machine's
own (`-march=native`); these build the others this CPU can run (`EXPERTMESH_MARCH`) in a fresh
cache, and run the kernels' parity tests against them in a subprocess (the kernels load once
per process).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

PARITY = [
    "test_the_kernel_gives_what_the_torch_path_gives",
    "test_bfloat16_as_the_torch_path_rounds_it",
    "test_large_scores_stay_finite",
    "test_the_kernel_sums_as_the_reference",
    "test_bfloat16_weights_sum_as_the_reference",
    "test_an_expert_twice_in_a_row_and_large_activations",
    "test_a_call_on_the_helper_thread_gives_the_same_bits",
    "test_the_kernels_plain_linear",
]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 targets")
@pytest.mark.parametrize("march", ["x86-64-v2", "x86-64-v3"])  # SSE4.2 (4 parts), AVX2 (2)
def test_the_kernels_agree_with_their_references_on_narrower_vectors(march, tmp_path):
    if march == "x86-64-v3" and "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU cannot run AVX2 code")
    env = dict(os.environ, EXPERTMESH_MARCH=march, EXPERTMESH_CACHE=str(tmp_path), CI="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         str(HERE / "test_fused_moe.py"), str(HERE / "test_decode_attention.py"),
         "-k", " or ".join(PARITY)],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
    built = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.so"))
    assert built == ["decode_attention", "fused_moe"]  # built for `march`, here

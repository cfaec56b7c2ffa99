"""`serve --pin-cpus`: the plan of cores (the applying thread is exercised by the benchmark)."""

from __future__ import annotations

import os
import threading

from expertmesh.cluster.cli.pinning import make_plan, pin


def test_engines_get_blocks_from_the_top_and_the_rest_keeps_the_lowest():
    p = make_plan([0, 1], 1)
    assert (p.blocks, p.rest, p.threads) == ([[1]], [0], 1)
    p = make_plan(list(range(8)), 3)  # 3 engines of 2 cores, 2 cores for the rest
    assert (p.blocks, p.rest, p.threads) == ([[2, 3], [4, 5], [6, 7]], [0, 1], 2)
    p = make_plan(list(range(16)), 5)
    assert p.threads == 3 and p.rest == [0] and sorted(sum(p.blocks, [])) == list(range(1, 16))


def test_too_few_cores_is_no_plan():
    assert make_plan([0, 1], 2) is None  # gateway + 2 workers on 2 cores: nothing to gain
    assert make_plan([0], 1) is None
    assert make_plan([0, 1, 2], 0) is None


def test_pin_moves_every_thread_of_a_process():
    here = sorted(os.sched_getaffinity(0))
    started, done = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), done.wait(10)))
    worker.start()
    started.wait(5)
    try:
        pin(os.getpid(), here[:1])
        assert os.sched_getaffinity(worker.native_id) == set(here[:1])
        assert os.sched_getaffinity(0) == set(here[:1])
    finally:
        pin(os.getpid(), here)
        done.set()
        worker.join()
    assert sorted(os.sched_getaffinity(0)) == here

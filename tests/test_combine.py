"""A worker computes concurrent exchanges of one layer as one batch, with the same results."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import CONFIGS, need_kernel
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.workers import fused_moe
from expertmesh.workers.combine import Combiner
from expertmesh.workers.experts import ExpertShard


def test_waiting_exchanges_of_a_layer_are_computed_together(make_checkpoint):
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    cfg = ModelConfig.from_dir(path)
    with CheckpointReader(path) as reader:
        shard = ExpertShard.load(reader, cfg, [0, 1, 2, 3], torch.float32)
    layer, other = cfg.moe_layers[0], cfg.moe_layers[1]
    g = torch.Generator().manual_seed(0)

    def rows(n):  # [n, H], [n, k] global ids (-1 where not ours, as a dispatcher sends), [n, k]
        x = torch.randn(n, cfg.hidden_size, generator=g)
        ids = torch.randint(0, cfg.num_experts, (n, cfg.top_k), generator=g)
        ids = torch.where(ids < 4, ids, -1)
        return x, ids, torch.rand(n, cfg.top_k, generator=g)

    calls = [(layer, *rows(3)), (layer, *rows(5)), (other, *rows(2)), (layer, *rows(1))]
    with torch.inference_mode():
        want = [shard.forward(*c) for c in calls]
    combiner = Combiner(shard)
    got: dict[int, torch.Tensor] = {}
    combiner._compute.acquire()  # a computation under way: the calls below all queue up
    threads = [
        threading.Thread(target=lambda i=i: got.__setitem__(i, combiner.forward(*calls[i])))
        for i in range(len(calls))
    ]
    for t in threads:
        t.start()
    while len(combiner._queue) < len(calls):
        threading.Event().wait(0.01)
    combiner._compute.release()
    for t in threads:
        t.join(10)
    for i, w in enumerate(want):
        torch.testing.assert_close(got[i], w, rtol=1e-5, atol=1e-5)
    stats = combiner.stats.snapshot()
    # three exchanges of one layer in one computation, one of the other layer in another
    assert stats.pop("compute_s") > 0
    assert stats == {"exchanges": 4, "batches": 2, "rows": 11}


@pytest.mark.parametrize("helper", ["0", "1"])
def test_a_worker_computes_on_the_kernels_helper_where_it_may(make_checkpoint, monkeypatch, helper):
    """With a second core (`EXPERTMESH_FUSED_MOE_HELPER`), a worker's computation runs on the
    kernel's helper thread and its own together: the same bits as one thread alone."""
    need_kernel(monkeypatch, "EXPERTMESH_FUSED_MOE", fused_moe.library, "fused-MoE")
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE_HELPER", helper)
    path = make_checkpoint(**CONFIGS["top4of16-shared2-start2-every2"])
    cfg = ModelConfig.from_dir(path)
    with CheckpointReader(path) as reader:
        shard = ExpertShard.load(reader, cfg, list(range(0, 16, 2)), torch.float32)
    layer = cfg.moe_layers[-1]
    assert fused_moe.is_blocked(shard.weights[layer][0][0])
    started = []
    monkeypatch.setattr(
        fused_moe, "start_swiglu", lambda *a, f=fused_moe.start_swiglu: started.append(1) or f(*a)
    )
    combiner = Combiner(shard)
    assert combiner.overlap == (helper == "1")
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 7, 40):
        x = torch.randn(n, cfg.hidden_size, generator=g)  # [n, H]
        ids = torch.randint(0, cfg.num_experts, (n, cfg.top_k), generator=g)
        ids = torch.where(ids % 2 == 0, ids, -1)  # [n, k]: the dispatcher's -1 where not ours
        weights = torch.rand(n, cfg.top_k, generator=g)  # [n, k]
        with torch.inference_mode():
            assert torch.equal(
                combiner.forward(layer, x, ids, weights), shard.forward(layer, x, ids, weights)
            )
    assert len(started) == (4 if helper == "1" else 0)

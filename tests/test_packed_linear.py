"""Linear layers on oneDNN with packed weights (CPU): same results as F.linear, never stale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from expertmesh.ernie import packed_linear
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.packed_linear import FusedLinear, PackedLinear, linear, pack, packs, unpack
from expertmesh.workers.experts import ExpertShard, grouped_swiglu
from torch import nn

needs_onednn = pytest.mark.skipif(
    not packed_linear._supported(torch.float32), reason="no oneDNN float32 kernel on this torch"
)


@pytest.fixture(autouse=True)
def packing_on(monkeypatch):
    """The path on whatever the CPU (by default only AMD CPUs take it); the routed experts'
    native kernel (`workers/fused_moe`, tests/test_fused_moe.py) off."""
    monkeypatch.setattr(packed_linear, "ENABLED", True)
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "0")


@needs_onednn
@pytest.mark.parametrize("rows", [0, 1, 5, 33])
def test_packed_linear_matches_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    x = torch.randn(rows, 64, generator=g)
    p = pack(w)
    assert p.is_mkldnn and p.shape == w.shape and torch.equal(unpack(p), w)
    torch.testing.assert_close(linear(x, p, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x[:, None], p)[:, 0], F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_fused_linear_is_the_layers_side_by_side_and_follows_new_weights():
    torch.manual_seed(0)
    layers = [nn.Linear(32, 48), nn.Linear(32, 16, bias=False), nn.Linear(32, 8)]
    fused, x = FusedLinear(), torch.randn(3, 32)

    def check():
        with torch.no_grad():
            got = fused(x, layers)
            for y, m in zip(got, layers, strict=True):
                torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
        return got

    check()
    packed = fused._packed[0]
    check()
    assert fused._packed[0] is packed  # made once
    with torch.no_grad():
        layers[1].weight.mul_(2)  # changed in place
    check()
    layers[2].load_state_dict({"weight": torch.randn(8, 32), "bias": torch.randn(8)}, assign=True)
    check()
    assert fused._packed[0] is not packed


@needs_onednn
def test_packed_linear_keeps_autograd_and_the_dense_path():
    m = PackedLinear(16, 4)
    x = torch.randn(2, 16, requires_grad=True)
    m(x).sum().backward()  # grad enabled: F.linear, which has a backward
    assert x.grad is not None and m._packed._packed is None
    with torch.inference_mode():
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), rtol=1e-5, atol=1e-5)
    assert m._packed._packed is not None


def test_the_setting(monkeypatch):
    assert packed_linear._enabled("1") and not packed_linear._enabled("0")
    monkeypatch.setattr(packed_linear, "_cpu_vendor", lambda: "GenuineIntel")
    assert not packed_linear._enabled("auto")
    monkeypatch.setattr(packed_linear, "_cpu_vendor", lambda: "AuthenticAMD")
    assert packed_linear._enabled("auto")


def test_nothing_is_packed_when_turned_off(monkeypatch):
    monkeypatch.setattr(packed_linear, "ENABLED", False)
    assert not packs(torch.zeros(2, 2))
    m = PackedLinear(4, 4)
    with torch.no_grad():
        m(torch.ones(1, 4))
    assert m._packed._packed is None


@needs_onednn
def test_expert_shard_packs_on_cpu_and_computes_as_the_stacked_weights(make_checkpoint):
    path = make_checkpoint(experts=8, top_k=2)
    cfg = ModelConfig.from_dir(path)
    with CheckpointReader(path) as reader:
        shard = ExpertShard.load(reader, cfg, [1, 2, 5], torch.float32)
        assert reader.bytes_read == shard.nbytes
    layer = cfg.moe_layers[0]
    w13, w2 = shard.weights[layer]
    assert isinstance(w13, list) and all(w.is_mkldnn for w in (*w13, *w2))
    d13, d2 = shard.stacked(layer)  # [3, 2I, H], [3, H, I]
    assert d13.shape == (3, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
    with CheckpointReader(path) as reader:  # each expert its own weights (no buffer shared)
        for j, e in enumerate([1, 2, 5]):
            p = f"model.layers.{layer}.mlp.experts.{e}"
            i, h = cfg.moe_intermediate_size, cfg.hidden_size
            assert torch.equal(d13[j, :i], reader.read(f"{p}.gate_proj.weight", (i, h)))
            assert torch.equal(d13[j, i:], reader.read(f"{p}.up_proj.weight", (i, h)))
            assert torch.equal(d2[j], reader.read(f"{p}.down_proj.weight", (h, i)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, cfg.hidden_size, generator=g)
    ids = torch.tensor([[1, 5], [2, -1], [-1, -1], [5, 1], [2, 2], [-1, 5]])  # -1: elsewhere
    weights = torch.rand(6, 2, generator=g)
    got = shard.forward(layer, x, ids, weights)
    local = shard._held.g2l[ids]
    torch.testing.assert_close(
        got, grouped_swiglu(x, local, weights, d13, d2), rtol=1e-5, atol=1e-5
    )
    again = ExpertShard(cfg, shard.experts, shard.weights)  # packed weights pass through
    assert again.weights[layer][0][0] is w13[0]

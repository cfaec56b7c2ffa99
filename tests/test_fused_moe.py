"""The native fused-MoE kernel (`workers/fused_moe`): the same sums as the torch paths, on any
routing, widths and row counts; blocked weights round-trip exactly; when it is taken; parity of
whole engines (text and VL) with transformers through it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, need_kernel, prompts_of, reference_model
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.router.engine import EngineConfig, LLMEngine
from expertmesh.router.sampling import SamplingParams
from expertmesh.workers import fused_moe
from expertmesh.workers.experts import ExpertShard, grouped_swiglu
from torch import nn

TOL = 1e-4


@pytest.fixture
def fused_on(monkeypatch):
    need_kernel(monkeypatch, "EXPERTMESH_FUSED_MOE", fused_moe.library, "fused-MoE")


def reference(x, ids, weights, w13, w2):
    """The sum in float64, one (row, slot) at a time: w13[e] [2I, H], w2[e] [H, I]."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for r in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[r, s])
            if e < 0:
                continue
            gate, up = (w13[e].double() @ x[r].double()).chunk(2)
            out[r] += float(weights[r, s]) * (w2[e].double() @ (F.silu(gate) * up))
    return out


def experts(widths, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = [torch.randn(2 * i, hidden, generator=g) / hidden**0.5 for i in widths]
    w2 = [torch.randn(hidden, i, generator=g) / i**0.5 for i in widths]
    return w13, w2


def routed(rows, hidden, widths, k, seed):
    """x [rows, H], ids [rows, k] (distinct experts, a quarter of slots -1: routed elsewhere),
    weights [rows, k] and dense experts of `widths`."""
    g = torch.Generator().manual_seed(rows)
    w13, w2 = experts(widths, hidden, seed=seed)
    x = torch.randn(rows, hidden, generator=g)
    ids = torch.rand(rows, len(widths), generator=g).argsort(dim=1)[:, :k]
    ids[torch.rand(rows, k, generator=g) < 0.25] = -1
    return x, ids, torch.rand(rows, k, generator=g), w13, w2


@pytest.mark.parametrize(
    "rows,hidden,widths,k",
    [
        (1, 64, [32] * 4, 2),
        (3, 16, [16, 48, 16], 1),
        (8, 512, [1024] * 16, 4),
        (9, 48, [64] * 6, 3),  # a row tile of 8 and one of 1
        (37, 80, [32, 16, 96, 32, 64], 3),  # widths of text and vision experts side by side
        (150, 32, [48] * 4, 2),  # prefill: ~75 rows an expert, many row tiles per column block
        (0, 64, [32] * 4, 2),
    ],
)
def test_the_kernel_sums_as_the_reference(fused_on, rows, hidden, widths, k):
    x, ids, weights, w13, w2 = routed(rows, hidden, widths, k, seed=rows + 1)
    b13 = [fused_moe.block13(w) for w in w13]
    b2 = [fused_moe.block2(w) for w in w2]
    got = fused_moe.fused_swiglu(x, ids, weights, b13, b2)
    assert got.dtype == torch.float32 and got.shape == (rows, hidden)
    want = reference(x, ids, weights, w13, w2)
    scale = max(1.0, float(want.abs().max())) if rows else 1.0
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-5 * scale)
    # the same call through grouped_swiglu, which takes the kernel for blocked weights
    torch.testing.assert_close(grouped_swiglu(x, ids, weights, b13, b2), got)


@pytest.mark.parametrize("rows,hidden,widths,k", [(1, 64, [32] * 4, 2), (37, 80, [32, 96, 64], 3)])
@pytest.mark.parametrize("helper", [False, True])
def test_bfloat16_weights_sum_as_the_reference(fused_on, rows, hidden, widths, k, helper):
    """bf16 weights (and bf16 rows in, bf16 out) computed in fp32: the float64 sum of the
    same bf16 values, rounded once to bf16 at the end."""
    x, ids, weights, w13, w2 = routed(rows, hidden, widths, k, seed=rows + 7)
    x, w13, w2 = x.bfloat16(), [w.bfloat16() for w in w13], [w.bfloat16() for w in w2]
    b13 = [fused_moe.block13(w) for w in w13]
    b2 = [fused_moe.block2(w) for w in w2]
    assert b13[0].dtype == torch.bfloat16
    call = fused_moe.start_swiglu if helper else fused_moe.fused_swiglu
    got = call(x, ids, weights, b13, b2)
    got = got.result() if helper else got
    assert got.dtype == torch.bfloat16 and got.shape == (rows, hidden)
    want = reference(x.float(), ids, weights, [w.float() for w in w13], [w.float() for w in w2])
    torch.testing.assert_close(got, want.bfloat16(), rtol=8e-3, atol=1e-5)
    exact = fused_moe.fused_swiglu(x.float(), ids, weights, b13, b2)  # fp32 rows, bf16 weights
    assert torch.allclose(exact.double(), want, rtol=0, atol=1e-5 * max(1.0, want.abs().max()))
    with pytest.raises(ValueError, match="float32 or all bfloat16"):
        fused_moe.fused_swiglu(x, ids, weights, [b13[0].float(), *b13[1:]], b2)


def test_an_expert_twice_in_a_row_and_large_activations(fused_on):
    """Repeated slots add up; exp saturates rather than overflowing (silu of +-100s)."""
    w13, w2 = experts([32, 32], 16, seed=3)
    w13 = [w * 40 for w in w13]
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[0, 0], [1, 0], [1, 1], [-1, 1], [0, -1]])
    weights = torch.rand(5, 2, generator=torch.Generator().manual_seed(5))
    got = fused_moe.fused_swiglu(
        x, ids, weights, [fused_moe.block13(w) for w in w13], [fused_moe.block2(w) for w in w2]
    )
    want = reference(x, ids, weights, w13, w2)
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_ids_out_of_range_are_refused(fused_on):
    w13, w2 = experts([16, 16], 16, seed=0)
    b13, b2 = [fused_moe.block13(w) for w in w13], [fused_moe.block2(w) for w in w2]
    with pytest.raises(ValueError, match="out of range"):
        fused_moe.fused_swiglu(
            torch.ones(2, 16), torch.tensor([[0], [2]]), torch.ones(2, 1), b13, b2
        )


def test_a_call_on_the_helper_thread_gives_the_same_bits(fused_on):
    """Started calls (several in flight, joined in any order) equal the one-thread call bit for
    bit: each expert's rows are its own and every row sums its slots in slot order, whichever
    thread computed which expert."""
    cases = []
    for rows, hidden, widths, k in [(1, 64, [32] * 4, 2), (9, 48, [64] * 6, 3), (0, 64, [32] * 4, 2),
                                    (37, 80, [32, 16, 96, 32, 64], 3), (150, 32, [48] * 4, 2)]:  # fmt: skip
        x, ids, weights, w13, w2 = routed(rows, hidden, widths, k, seed=rows + 7)
        b13, b2 = [fused_moe.block13(w) for w in w13], [fused_moe.block2(w) for w in w2]
        cases.append((x, ids, weights, b13, b2))
    for _ in range(20):
        started = [fused_moe.start_swiglu(*c) for c in cases]
        for c, s in reversed(list(zip(cases, started))):
            assert torch.equal(s.result(), fused_moe.fused_swiglu(*c))
            assert s.result() is s.result()  # joined once; the answer stays


def test_a_started_call_refuses_bad_ids_and_survives_being_dropped(fused_on):
    w13, w2 = experts([16, 16], 16, seed=0)
    b13, b2 = [fused_moe.block13(w) for w in w13], [fused_moe.block2(w) for w in w2]
    with pytest.raises(ValueError, match="out of range"):
        fused_moe.start_swiglu(
            torch.ones(2, 16), torch.tensor([[0], [2]]), torch.ones(2, 1), b13, b2
        )
    x, ids, weights = torch.randn(64, 16), torch.tensor([[0], [1]]).repeat(32, 1), torch.ones(64, 1)
    want = fused_moe.fused_swiglu(x, ids, weights, b13, b2)
    for _ in range(50):  # a caller that failed before joining: its buffers outlive the helper
        fused_moe.start_swiglu(x.clone(), ids.clone(), weights.clone(), b13, b2)
    assert torch.equal(fused_moe.start_swiglu(x, ids, weights, b13, b2).result(), want)


def test_when_the_helper_thread_is_used(monkeypatch):
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE_HELPER", "1")
    assert fused_moe.helper_thread()
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE_HELPER", "0")
    assert not fused_moe.helper_thread()
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE_HELPER", "auto")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert not fused_moe.helper_thread()  # one core: nothing to overlap on
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert fused_moe.helper_thread()


def test_blocking_round_trips_exactly():
    w13, w2 = experts([48], 32, seed=1)
    b13, b2 = fused_moe.block13(w13[0]), fused_moe.block2(w2[0])
    assert b13.shape == (3, 2, 32, 16) and b2.shape == (2, 48, 16)
    assert fused_moe.is_blocked(b13) and fused_moe.is_blocked(b2)
    assert not fused_moe.is_blocked(w13[0])
    assert torch.equal(fused_moe.unblock(b13), w13[0])
    assert torch.equal(fused_moe.unblock(b2), w2[0])
    # column block j of gate: rows 16j.. of the gate half, k-major
    assert torch.equal(b13[1, 0], w13[0][16:32].T)
    assert torch.equal(b13[2, 1], w13[0][48 + 32 : 48 + 48].T)


def test_when_the_kernel_is_taken(monkeypatch, fused_on):
    f32, cpu = torch.float32, "cpu"
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "auto")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fused_moe.usable(f32, cpu, 64, [32, 48])
        assert fused_moe.usable(torch.bfloat16, cpu, 64, [32])  # weights widened in registers
        assert not fused_moe.usable(torch.float16, cpu, 64, [32])
        assert not fused_moe.usable(f32, "meta", 64, [32])
        assert not fused_moe.usable(f32, cpu, 40, [32])  # hidden not a multiple of 16
        assert not fused_moe.usable(f32, cpu, 64, [32, 24])  # nor a width
        torch.set_num_threads(2)
        assert not fused_moe.usable(f32, cpu, 64, [32])  # oneDNN's parallel matmuls instead
        monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "1")
        assert fused_moe.usable(f32, cpu, 64, [32])
        monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "0")
        torch.set_num_threads(1)
        assert not fused_moe.usable(f32, cpu, 64, [32])
    finally:
        torch.set_num_threads(threads)


def test_without_a_compiler_the_torch_path_stays(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "1")
    monkeypatch.setattr(fused_moe, "_compiler", lambda: None)
    fused_moe.library.cache_clear()
    try:
        assert fused_moe.library() is None
        assert not fused_moe.usable(torch.float32, "cpu", 64, [32])
        assert "no C++ compiler" in caplog.text
    finally:
        fused_moe.library.cache_clear()


def test_a_broken_compiler_is_a_warning_not_an_error(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(fused_moe, "_compiler", lambda: "/bin/false")
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    fused_moe.library.cache_clear()
    try:
        assert fused_moe.library() is None
        assert "not built" in caplog.text
        assert not list(tmp_path.glob("*.so"))  # nothing half-written left behind
    finally:
        fused_moe.library.cache_clear()


def test_the_build_is_cached_by_source_and_cpu(fused_on, monkeypatch, tmp_path):
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    fused_moe.library.cache_clear()
    try:
        assert fused_moe.library() is not None
        built = list(tmp_path.glob("fused_moe-*.so"))
        assert len(built) == 1
        fused_moe.library.cache_clear()
        mtime = built[0].stat().st_mtime_ns
        assert fused_moe.library() is not None
        assert built[0].stat().st_mtime_ns == mtime  # taken from the cache, not rebuilt
    finally:
        fused_moe.library.cache_clear()


def test_a_shard_keeps_blocked_weights_and_gives_them_back_dense(fused_on, make_checkpoint):
    path = make_checkpoint(experts=8, top_k=2)
    cfg = ModelConfig.from_dir(path)
    with CheckpointReader(path) as reader:
        shard = ExpertShard.load(reader, cfg, [1, 2, 5], torch.float32)
        assert reader.bytes_read == shard.nbytes
    layer = cfg.moe_layers[0]
    w13, w2 = shard.weights[layer]
    assert all(fused_moe.is_blocked(w) for w in (*w13, *w2))
    d13, d2 = shard.stacked(layer)  # [3, 2I, H], [3, H, I]
    i, h = cfg.moe_intermediate_size, cfg.hidden_size
    with CheckpointReader(path) as reader:
        for j, e in enumerate([1, 2, 5]):
            p = f"model.layers.{layer}.mlp.experts.{e}"
            assert torch.equal(d13[j, :i], reader.read(f"{p}.gate_proj.weight", (i, h)))
            assert torch.equal(d13[j, i:], reader.read(f"{p}.up_proj.weight", (i, h)))
            assert torch.equal(d2[j], reader.read(f"{p}.down_proj.weight", (h, i)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, h, generator=g)
    ids = torch.tensor([[1, 5], [2, -1], [-1, -1], [5, 1], [2, 2], [-1, 5]])
    weights = torch.rand(6, 2, generator=g)
    local = shard._held.g2l[ids]
    torch.testing.assert_close(
        shard.forward(layer, x, ids, weights),
        grouped_swiglu(x, local, weights, d13, d2),
        rtol=1e-5,
        atol=1e-5,
    )
    again = ExpertShard(cfg, shard.experts, shard.weights)  # blocked weights pass through
    assert again.weights[layer][0][0] is w13[0]


@pytest.mark.parametrize("shards,helper", [(1, "0"), (1, "1"), (3, "1")])
def test_engine_logits_and_greedy_tokens_match_transformers(
    fused_on, make_checkpoint, monkeypatch, shards, helper
):
    """helper: the routed experts begun on the kernel's helper thread beside the shared ones."""
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE_HELPER", helper)
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    engine = LLMEngine.from_checkpoint(path, num_shards=shards)
    assert engine.dispatcher.overlap == (helper == "1")
    engine.dispatcher.overlap_rows = 1  # every layer, decode steps too, through the helper
    w13 = engine.dispatcher.shards[0].weights[engine.model_cfg.moe_layers[0]][0]
    assert fused_moe.is_blocked(w13[0])
    prompts = prompts_of([1, 9, 64], ModelConfig.from_dir(path).vocab_size, seed=11)
    model = reference_model(path)
    with torch.no_grad():
        for prompt, got in zip(prompts, engine.score(prompts)):
            want = model(torch.tensor([prompt])).logits[0].float()
            assert (got - want).abs().max() <= TOL
        outs = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
        for prompt, out in zip(prompts, outs):
            want = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
            assert out.token_ids == want[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "config", ["top4of16-shared2-start2-every2", "top2of8-noshared", "bias-untied-top3of6"]
)
def test_other_configs_score_and_decode_as_transformers(fused_on, make_checkpoint, config):
    """Dense layers between MoE layers, no shared experts, biases (where the MLPs keep oneDNN):
    a short prompt's logits (its MLPs through the kernel) and greedy tokens."""
    path = make_checkpoint(**CONFIGS[config])
    engine = LLMEngine.from_checkpoint(path, num_shards=2)
    prompts = prompts_of([1, 9], ModelConfig.from_dir(path).vocab_size, seed=5)
    model = reference_model(path)
    with torch.no_grad():
        for prompt in prompts:
            got = engine.score([prompt])[0]
            assert (got - model(torch.tensor([prompt])).logits[0].float()).abs().max() <= TOL
        outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
        for prompt, out in zip(prompts, outs):
            want = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
            assert out.token_ids == want[0, len(prompt) :].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_dense_mlp_through_the_kernel(fused_on, monkeypatch, dtype):
    """The shared experts and dense MLPs (`layers.MLP`): the kernel up to KERNEL_ROWS rows,
    oneDNN above; the same sums as the torch path; the blocked copy follows new weights."""
    from expertmesh.router.layers import MLP

    torch.manual_seed(0)
    mlp = MLP(48, 80, bias=False).to(dtype).eval()
    calls = []
    real = fused_moe.fused_swiglu
    monkeypatch.setattr(fused_moe, "fused_swiglu", lambda *a: calls.append(1) or real(*a))

    def torch_path(x):
        gate, up = F.linear(x, mlp.gate_proj.weight), F.linear(x, mlp.up_proj.weight)
        return F.linear(F.silu(gate) * up, mlp.down_proj.weight)

    tol = 1e-5 if dtype == torch.float32 else 0.02
    for rows in [1, 5, MLP.KERNEL_ROWS, MLP.KERNEL_ROWS + 1, 0]:
        x = torch.randn(rows, 48).to(dtype)
        calls.clear()
        with torch.inference_mode():
            got, want = mlp(x), torch_path(x)
        assert got.dtype == dtype and got.shape == (rows, 48)
        assert calls == ([1] if rows <= MLP.KERNEL_ROWS else [])
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    with torch.no_grad():  # new weights in place: the kernel's copy is re-made
        mlp.down_proj.weight.mul_(2)
    x = torch.randn(3, 48).to(dtype)
    with torch.inference_mode():
        assert torch.allclose(mlp(x).float(), torch_path(x).float(), atol=tol, rtol=tol)
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "0")
    calls.clear()
    with torch.inference_mode():
        mlp(x)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,outs", [(48, [64]), (40, [32, 16, 16]), (7, [16, 48])])
def test_the_kernels_plain_linear(fused_on, dtype, k, outs):
    """`fused_moe.linear` on a `block2` weight: x @ w.T for any input width and any rows, as
    float64 does it; bf16 weights widened to fp32 in registers."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(sum(outs), k, generator=g).to(dtype)  # [O, K]
    for rows in [1, 3, 4, 9, 17]:
        x = torch.randn(rows, k, generator=g)
        got = fused_moe.linear(x, fused_moe.block2(w))
        want = (x.double() @ w.double().T).float()
        assert got.shape == (rows, sum(outs)) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        fused_moe.linear(torch.randn(2, k + 1), fused_moe.block2(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_projections_through_the_kernel(fused_on, monkeypatch, dtype, bias):
    """The attention's q/k/v and o_proj and the lm_head (`layers.Projection`): the kernel's
    linear up to KERNEL_ROWS rows, oneDNN / F.linear above; every layer's output as
    F.linear's; the blocked copy follows new weights; off with the kernel off."""
    from expertmesh.router.layers import ProjectedLinear, Projection

    torch.manual_seed(1)
    layers = [nn.Linear(40, o, bias=bias).to(dtype) for o in (32, 16, 16)]
    if bias:
        layers[1].bias = None  # one layer without: zeros in the joint bias
    one = ProjectedLinear(40, 48, bias=bias).to(dtype)
    qkv = Projection()
    calls = []
    real = fused_moe.linear
    monkeypatch.setattr(fused_moe, "linear", lambda *a: calls.append(1) or real(*a))
    tol = 1e-5 if dtype == torch.float32 else 0.02
    for rows in [1, 5, Projection.KERNEL_ROWS, Projection.KERNEL_ROWS + 1, 0]:
        x = torch.randn(rows, 40).to(dtype)
        calls.clear()
        with torch.inference_mode():
            got, single = qkv(x, layers), one(x)
        assert calls == ([1, 1] if rows <= Projection.KERNEL_ROWS else [])
        for m, y in zip(layers, got, strict=True):
            assert y.dtype == dtype and y.shape == (rows, m.out_features)
            want = F.linear(x.float(), m.weight.float(), None if m.bias is None else m.bias.float())
            torch.testing.assert_close(y.float(), want, atol=tol, rtol=tol)
        want = F.linear(
            x.float(), one.weight.float(), None if one.bias is None else one.bias.float()
        )
        torch.testing.assert_close(single.float(), want, atol=tol, rtol=tol)
    with torch.no_grad():  # new weights in place: the kernel's copy is re-made
        layers[2].weight.mul_(2)
    x = torch.randn(3, 40).to(dtype)
    with torch.inference_mode():
        got = qkv(x, layers)[2]
    torch.testing.assert_close(
        got.float(), F.linear(x, layers[2].weight, layers[2].bias).float(), atol=tol, rtol=tol
    )
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "0")
    calls.clear()
    with torch.inference_mode():
        qkv(x, layers), one(x)
    assert calls == []


def test_bfloat16_engine_through_the_kernel_stays_close_to_fp32(fused_on, make_checkpoint):
    """A bf16 engine whose shards hold blocked bf16 weights: its logits track fp32's as the
    torch bf16 path's do (bf16 keeps ~3 significant digits)."""
    path = make_checkpoint(**CONFIGS["top2of8-shared1"])
    prompt = prompts_of([16], 200)[0]
    engine = LLMEngine.from_checkpoint(path, EngineConfig(dtype="bfloat16"), num_shards=2)
    layer = engine.model_cfg.moe_layers[0]
    w13 = engine.dispatcher.shards[0].weights[layer][0]
    assert fused_moe.is_blocked(w13[0]) and w13[0].dtype == torch.bfloat16
    got = engine.score([prompt])[0]
    with torch.no_grad():
        want = reference_model(path)(torch.tensor([prompt])).logits[0].float()
    assert torch.isfinite(got).all()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    outs = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(outs[0].token_ids) == 8


def test_vl_engine_matches_transformers(fused_on, vl_checkpoint):
    """Text and vision experts (their own widths) in one kernel call."""
    from vl_reference import CASES, max_diff, prompt, ref_greedy, ref_logits

    engine = LLMEngine.from_checkpoint(vl_checkpoint, num_shards=2)
    layer = engine.model_cfg.moe_layers[0]
    w13 = engine.dispatcher.shards[0].vision_weights[layer][0]
    assert fused_moe.is_blocked(w13[0])
    names = list(CASES)
    prompts, images = zip(*(prompt(vl_checkpoint, n) for n in names))
    for name, got in zip(names, engine.score(prompts, images=images)):
        assert max_diff(got, ref_logits(vl_checkpoint, name)) <= TOL
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0), images=images)
    assert [o.token_ids for o in outs] == [ref_greedy(vl_checkpoint, n, 8) for n in names]


@pytest.mark.parametrize("widths", [(40, 32), (32, 24)])
def test_vl_shard_with_a_width_the_kernel_cannot_block(fused_on, tmp_path, widths):
    """Text and vision experts of which one width is no multiple of 16 (the kernel's): every
    expert of a shard takes the same form, so one call takes both (blocked vision experts next
    to packed text ones once failed in every expert worker of such a checkpoint)."""
    from expertmesh.ernie.tiny_vl import make_tiny_vl
    from vl_reference import CASES, max_diff, prompt, ref_greedy, ref_logits

    path = make_tiny_vl(tmp_path / "vl", seed=1, experts=3, expert_widths=widths)
    names = list(CASES)
    prompts, images = zip(*(prompt(path, n) for n in names))
    for shards in (1, 2):  # one shard holds text and vision experts
        engine = LLMEngine.from_checkpoint(path, num_shards=shards)
        for shard in engine.dispatcher.shards:
            for groups in (shard.weights, shard.vision_weights):
                assert not any(fused_moe.is_blocked(w) for w13, _ in groups.values() for w in w13)
        for name, got in zip(names, engine.score(prompts, images=images)):
            assert max_diff(got, ref_logits(path, name)) <= TOL
        outs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0), images=images)
        assert [o.token_ids for o in outs] == [ref_greedy(path, n, 6) for n in names]

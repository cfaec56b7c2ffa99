"""Expert load balancing: balanced placements with copies of hot experts, dispatch over the
copies (same numbers as one owner per expert), shards that change their experts while they
serve, and a live move that a running request does not notice."""

from __future__ import annotations

import queue
import random
import time

import pytest
import torch
from conftest import CONFIGS, prompts_of
from expertmesh.cluster.cli.main import main
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.router.dispatch import ExchangeLoad, split_by_worker, split_small
from expertmesh.router.engine import LLMEngine
from expertmesh.router.loop import EngineLoop
from expertmesh.router.rebalance import Rebalancer, shard_holder
from expertmesh.router.sampling import SamplingParams
from expertmesh.workers.experts import ExpertShard
from expertmesh.workers.placement import ExpertPlacement, balanced, shards_of_slots
from test_parity import TOL, ref_greedy, ref_logits

HOT = dict(experts=16, top_k=4, shared=2, seed=1, hot_experts=3, hot_bias=1.0)


def check_valid(p: ExpertPlacement, num_experts: int, redundant: int) -> None:
    room = -(-(num_experts + redundant) // p.num_shards)
    assert p.num_experts == num_experts and all(p.copies)  # every expert placed
    assert all(len(set(c)) == len(c) for c in p.copies)  # no shard holds two copies
    assert all(len(p.experts_of(s)) <= room for s in range(p.num_shards))  # none over capacity
    assert num_experts <= p.num_copies <= num_experts + redundant


# -- placement --------------------------------------------------------------------------------


def test_balanced_moves_hot_experts_apart_and_copies_help():
    load = [100.0] * 3 + [300 / 13] * 13  # 3 hot experts of 16, all in worker 0's block
    contiguous = ExpertPlacement.contiguous(16, 2)
    assert contiguous.imbalance(load) == pytest.approx(1.385, abs=1e-3)
    moved = balanced(load, 2, redundant=0)
    check_valid(moved, 16, 0)
    assert moved.imbalance(load) == pytest.approx(1.128, abs=1e-3)
    copied = balanced(load, 2, redundant=4)
    check_valid(copied, 16, 4)
    assert copied.imbalance(load) == pytest.approx(1.0)
    assert {e for e, c in enumerate(copied.copies) if len(c) > 1} >= {0, 1, 2}  # the hot ones


@pytest.mark.parametrize("seed", range(40))
def test_balanced_placements_are_valid_and_copies_never_hurt(seed):
    rng = random.Random(seed)
    shards, experts = rng.choice([2, 3, 4, 8]), rng.choice([8, 12, 16, 64])
    redundant = rng.randint(0, experts)
    load = [rng.expovariate(1.0) ** 3 for _ in range(experts)]  # heavy-tailed
    with_copies, without = balanced(load, shards, redundant), balanced(load, shards, 0)
    check_valid(with_copies, experts, redundant)
    check_valid(without, experts, 0)
    assert with_copies.imbalance(load) <= without.imbalance(load) + 1e-9


@pytest.mark.parametrize("shards,experts,redundant", [(2, 8, 0), (3, 8, 0), (2, 16, 2), (4, 64, 8)])
def test_uniform_load_stays_as_balanced_as_contiguous(shards, experts, redundant):
    load = [7.0] * experts
    p = balanced(load, shards, redundant)
    check_valid(p, experts, redundant)
    assert p.imbalance(load) <= ExpertPlacement.contiguous(experts, shards).imbalance(load) + 1e-9


def test_balanced_is_deterministic_and_refuses_too_many_copies():
    load = [5, 1, 9, 3, 3, 8, 2, 7]
    assert balanced(load, 3, 4) == balanced(list(load), 3, 4)
    with pytest.raises(ValueError, match="at most 8"):
        balanced(load, 2, 9)


def test_copies_split_an_experts_tokens_evenly():
    p = ExpertPlacement.from_copies([[0, 1], [1], [0, 2, 1]], 3)
    table, count = p.copy_table()
    ids = torch.tensor([[0, 2]] * 6)  # [T=6, k=2]: every token picks experts 0 and 2
    shard = shards_of_slots(ids, table, count)  # [6, 2]
    assert shard[:, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert shard[:, 1].tolist() == [0, 2, 1, 0, 2, 1]
    with pytest.raises(ValueError, match="two copies"):
        ExpertPlacement.from_copies([[0, 0], [1]], 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_few_rows_split_in_python_as_the_tensor_path_splits_them(dtype):
    """`split_small` (decode steps of a few tokens on CPU) against `shards_of_slots` +
    `split_by_worker`: the same parts, rows, ids and weights, and the same pair counts."""
    rng, with_copies = random.Random(0), 0
    for trial in range(60):
        shards, experts, k = rng.choice([(2, 16, 4), (3, 8, 2), (4, 12, 6)])
        load = [rng.random() ** 4 for _ in range(experts)]  # skewed: hot experts get copies
        p = ExpertPlacement.contiguous(experts, shards) if trial % 2 else balanced(load, shards, 3)
        with_copies += p.num_copies > experts
        table, count = p.copy_table()
        t = rng.randint(1, 8)
        ids = torch.tensor([rng.sample(range(experts), k) for _ in range(t)])  # [T, k]
        weights = torch.rand(t, k).to(dtype)  # [T, k]
        x = torch.randn(t, 32).to(dtype)  # [T, H]
        shard_of = shards_of_slots(ids, table, count)  # [T, k]
        want = split_by_worker(x, ids, weights, shard_of)
        got, pairs = split_small(x, ids, weights, [list(c) for c in p.copies], shards)
        assert pairs == torch.bincount(shard_of.flatten(), minlength=shards).tolist()
        assert list(got) == list(want)
        for w in want:
            for field in ("rows", "x", "expert_ids", "weights"):
                a, b = getattr(got[w], field), getattr(want[w], field)
                assert a.dtype == b.dtype and torch.equal(a, b), (trial, w, field)
    assert with_copies >= 10


# -- dispatch over copies ---------------------------------------------------------------------


def copied(num_experts: int, shards: int, redundant: int, seed: int = 0) -> ExpertPlacement:
    """A balanced placement with copies for a random skewed load."""
    g = torch.Generator().manual_seed(seed)
    load = (torch.rand(num_experts, generator=g) ** 4).tolist()
    p = balanced(load, shards, redundant)
    assert p.num_copies > num_experts
    return p


@pytest.mark.parametrize("name", ["top2of8-shared1", "top4of16-shared2-start2-every2"])
@pytest.mark.parametrize("shards,redundant", [(2, 3), (3, 6)])
def test_copies_give_the_logits_of_one_owner_and_of_transformers(
    make_checkpoint, name, shards, redundant
):
    path = make_checkpoint(**CONFIGS[name])
    cfg = ModelConfig.from_dir(path)
    single = LLMEngine.from_checkpoint(path, num_shards=shards)
    placement = copied(cfg.num_experts, shards, redundant)
    engine = LLMEngine.from_checkpoint(path, placement=placement)
    prompts = prompts_of([1, 9, 40], cfg.vocab_size, seed=shards)
    for prompt, got, one in zip(prompts, engine.score(prompts), single.score(prompts)):
        assert (got - one).abs().max() <= TOL
        assert (got - ref_logits(path, prompt)).abs().max() <= TOL
    load = engine.dispatcher.load.snapshot()
    assert sum(load["pairs"]) == 50 * cfg.top_k * len(cfg.moe_layers)  # every (token, expert)
    greedy = SamplingParams(max_tokens=16, temperature=0)
    outs = engine.generate(prompts, greedy)
    assert [o.token_ids for o in outs] == [ref_greedy(path, p, 16) for p in prompts]


def test_exchange_load_counts_rows_and_pairs(make_checkpoint):
    path = make_checkpoint(**HOT)
    engine = LLMEngine.from_checkpoint(path, num_shards=2)
    prefill = SamplingParams(max_tokens=1)  # one step over the 32 prompt tokens

    def exchanges() -> dict:
        engine.dispatcher.load = ExchangeLoad(2)
        engine.generate(prompts_of([32], 400, seed=1), prefill)
        return engine.dispatcher.load.snapshot()

    before, moe = exchanges(), len(engine.model_cfg.moe_layers)
    assert before["exchanges"] == moe and sum(before["pairs"]) == 32 * 4 * moe
    assert before["rows"][0] == 32 * moe  # the 3 hot experts all sit on worker 0
    assert before["pairs_max_over_mean"] > 1.5
    shards = engine.dispatcher.shards
    rebalancer = Rebalancer(
        engine.dispatcher, shard_holder(shards, path), lambda: engine.expert_counts
    )
    rebalancer.move_now(balanced(engine.expert_counts.sum(0).tolist(), 2, redundant=2))
    after = exchanges()
    assert after["pairs_max_over_mean"] < 1.15 < before["pairs_max_over_mean"]
    assert after["rows_max_over_mean"] < before["rows_max_over_mean"]


# -- shards that change their experts ---------------------------------------------------------


@pytest.mark.parametrize("form", ["fused", "packed", "dense"])
def test_a_shard_reads_only_its_new_experts_and_computes_as_if_loaded(
    make_checkpoint, monkeypatch, form
):
    from expertmesh.ernie import packed_linear

    monkeypatch.setattr(packed_linear, "ENABLED", form != "dense")
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE", "1" if form == "fused" else "0")
    path = make_checkpoint(**CONFIGS["top4of16-shared2-start2-every2"])
    cfg = ModelConfig.from_dir(path)
    with CheckpointReader(path) as reader:
        shard = ExpertShard.load(reader, cfg, [0, 1, 2, 3], torch.float32)
    with CheckpointReader(path) as reader:
        assert shard.hold(reader, [2, 3, 9, 12]) == 2
        read = set(reader.tensors_read)
    assert read and all(".experts.9." in k or ".experts.12." in k for k in read)
    assert shard.experts == [2, 3, 9, 12]
    with CheckpointReader(path) as reader:
        fresh = ExpertShard.load(reader, cfg, [2, 3, 9, 12], torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, cfg.hidden_size, generator=g)  # [10, H]
    ids = torch.tensor([[2, 9, -1, 12], [3, -1, -1, -1]] * 5)  # [10, 4]
    w = torch.rand(10, 4, generator=g)
    layer = cfg.moe_layers[0]
    assert torch.allclose(shard.forward(layer, x, ids, w), fresh.forward(layer, x, ids, w))
    with pytest.raises(ValueError, match=r"experts \[0\] are not held"):
        shard.forward(layer, x, torch.tensor([[0, 2, -1, -1]] * 10), w)


@pytest.mark.parametrize("fused", ["1", "0"])
def test_a_vl_shard_moves_text_and_vision_experts(vl_checkpoint, monkeypatch, fused):
    monkeypatch.setenv("EXPERTMESH_FUSED_MOE", fused)
    cfg = ModelConfig.from_dir(vl_checkpoint)  # 4 text experts (0..3), 4 vision (4..7)
    with CheckpointReader(vl_checkpoint) as reader:
        shard = ExpertShard.load(reader, cfg, [0, 1, 4, 5], torch.float32)
        assert shard.hold(reader, [1, 3, 5, 6, 7]) == 3
        fresh = ExpertShard.load(reader, cfg, [1, 3, 5, 6, 7], torch.float32)
    assert shard.experts == fresh.experts == [1, 3, 5, 6, 7]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, cfg.hidden_size, generator=g)  # [6, H]
    ids = torch.tensor([[1, 3], [5, 6], [7, -1], [3, 1], [6, 5], [-1, 7]])  # [6, 2]
    w = torch.rand(6, 2, generator=g)
    layer = cfg.moe_layers[0]
    torch.testing.assert_close(shard.forward(layer, x, ids, w), fresh.forward(layer, x, ids, w))


# -- a live move ------------------------------------------------------------------------------


def run_loop(loop: EngineLoop, prompts, params) -> list[list[int]]:
    queues = []
    for i, p in enumerate(prompts):
        q: queue.Queue = queue.Queue()
        loop.submit(f"r{i}", p, params, q.put)
        queues.append(q)
    out = []
    for q in queues:
        tokens = []
        while True:
            ev = q.get(timeout=120)
            assert ev.error is None, ev.error
            if ev.token_id is not None:
                tokens.append(ev.token_id)
            if ev.finish_reason is not None:
                break
        out.append(tokens)
    return out


def test_requests_running_through_a_move_get_the_same_tokens(make_checkpoint):
    """A balancing period ends while requests decode: the shards load copies of the hot
    experts, the placement switches between two steps, the shards drop what they no longer
    need; every token is the one the fixed placement gives (and transformers)."""
    path = make_checkpoint(**HOT)
    prompts = prompts_of([5, 17, 3, 30], 400, seed=3)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = LLMEngine.from_checkpoint(path, num_shards=2).generate(prompts, params)

    engine = LLMEngine.from_checkpoint(path, num_shards=2)
    shards = engine.dispatcher.shards
    switched_at: list[int] = []  # steps done when the placement switched
    steps = [0]
    step = engine.step

    def counted_step():  # >= 3 ms a step: the period (50 ms) ends mid-generation
        steps[0] += 1
        time.sleep(0.003)
        return step()

    engine.step = counted_step
    set_placement = engine.dispatcher.set_placement
    engine.dispatcher.set_placement = lambda p: (switched_at.append(steps[0]), set_placement(p))
    rebalancer = Rebalancer(
        engine.dispatcher,
        shard_holder(shards, path),
        lambda: engine.expert_counts,
        period_s=0.05,
        redundant=2,
    )
    move_to = rebalancer.move_to

    def once(target):  # one move in this test, however slow the machine makes the steps
        rebalancer.period_s = 0
        return move_to(target)

    rebalancer.move_to = once
    loop = EngineLoop(engine, rebalancer)
    try:
        got = run_loop(loop, prompts, params)
        deadline = time.monotonic() + 30
        while rebalancer.busy and time.monotonic() < deadline:  # the drop, if still going
            time.sleep(0.01)
    finally:
        loop.stop()
    assert got == [o.token_ids for o in want]
    assert got[0] == ref_greedy(path, prompts[0], 40)
    assert switched_at and 0 < switched_at[0] < steps[0]  # it switched mid-generation
    placement = engine.dispatcher.placement
    assert placement.num_copies > 16  # hot experts got copies
    assert placement.imbalance(engine.expert_counts.sum(0).tolist()) < 1.1
    assert [s.experts for s in shards] == [placement.experts_of(w) for w in range(2)]


def test_a_move_on_an_idle_loop_completes_then_nothing_left_to_gain(make_checkpoint):
    path = make_checkpoint(**HOT)
    engine = LLMEngine.from_checkpoint(path, num_shards=2)
    shards = engine.dispatcher.shards
    rebalancer = Rebalancer(
        engine.dispatcher, shard_holder(shards, path), lambda: engine.expert_counts, redundant=2
    )
    loop = EngineLoop(engine, rebalancer)
    params = SamplingParams(max_tokens=8, temperature=0)
    prompts = prompts_of([6, 20], 400)
    try:
        worst = ExpertPlacement.from_copies([[1]] * 8 + [[0]] * 8, 2)  # hot 0..2 on shard 1
        assert loop.call(lambda: rebalancer.move_to(worst)).result(5).result(30) == worst
        assert engine.dispatcher.placement == worst and shards[0].experts == list(range(8, 16))
        assert run_loop(loop, prompts, params) == [ref_greedy(path, p, 8) for p in prompts]
        better = loop.call(rebalancer.propose).result(5)  # the load since start: skewed
        assert better is not None and better.imbalance(engine.expert_counts.sum(0).tolist()) < 1.1
        assert loop.call(lambda: rebalancer.move_to(better)).result(5).result(30) == better
        assert run_loop(loop, prompts, params) == [ref_greedy(path, p, 8) for p in prompts]
        assert loop.call(rebalancer.propose).result(5) is None  # the same load: balanced now
        assert rebalancer.moves == 2
    finally:
        loop.stop()


# -- flags, the hot checkpoint, the benchmark -------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--rebalance-period-s", "5", "--gateways", "2"], "needs --gateways 1"),
        (["--redundant-experts", "2"], "--redundant-experts needs --rebalance-period-s"),
    ],
)
def test_serve_refuses_moves_with_a_shared_pool_and_copies_without_moves(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["serve", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_serve_takes_the_balancing_flags():
    from expertmesh.cluster.config import ServeArgs

    args = ServeArgs(rebalance_period_s=30, redundant_experts=4)
    assert args.cluster_config("m").rebalance_period_s == 30
    assert ServeArgs(rebalance_period_s=30, gateways="2", transport="local").gateways == "2"


def test_make_tiny_hot_experts(capsys, tmp_path):
    assert main(["make-tiny", str(tmp_path / "hot"), "--experts", "8", "--hot-experts", "2"]) == 0
    assert main(["make-tiny", str(tmp_path / "cold"), "--experts", "8"]) == 0
    with CheckpointReader(tmp_path / "hot") as hot, CheckpointReader(tmp_path / "cold") as cold:
        key = "model.layers.1.mlp.moe_statics.e_score_correction_bias"
        boost = hot.read(key, (1, 8)) - cold.read(key, (1, 8))
        assert torch.allclose(boost, torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0]]))
        gate = "model.layers.1.mlp.gate.weight"
        assert torch.equal(hot.read(gate, (8, 64)), cold.read(gate, (8, 64)))
    counts = LLMEngine.from_checkpoint(tmp_path / "hot")
    counts.generate(prompts_of([20], 400), SamplingParams(max_tokens=4))
    picks = counts.expert_counts  # [moe_layers, 8]: 23 tokens went through each layer
    assert (picks[:, :2] >= 20).all()  # (sampled tokens: nearly every one picks both)


def test_bench_eplb_in_process(capsys, make_checkpoint):
    path = make_checkpoint(**HOT)
    argv = ["bench", "eplb", "--model", str(path), "--transport", "local"]
    assert main([*argv, "--batch", "8", "--tokens", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if "| 8 |" in line}
    names = list(rows)
    assert names[:2] == ["contiguous", "balanced"] and names[2].startswith("balanced + ")
    ratio = [float(v.split(" | ")[3]) for v in rows.values()]  # pairs max/mean, decode steps
    assert ratio[0] > 1.5 and max(ratio[1:]) < ratio[0] - 0.3

"""GPU benchmark of the in-process engine at the real ERNIE-4.5-21B-A3B layer shapes.

Why: the CPU benchmarks say nothing about where a decode step goes on an accelerator. This
writes a random checkpoint with the real shapes (hidden 2560, 20/4 heads of 128, 64 experts
top-6 of intermediate 1536, 2 shared, vocab 103424; layer 0 dense of 12288) but only a few
layers, loads it with the gateway and every expert shard on one device (the `local`
transport), and prints markdown tables of:

1. decode step time per batch size against the HBM roofline (the weight bytes a step must
   read, over the device-to-device copy bandwidth measured in the same run);
2. CUDA graphs: whether the engine's forward can be captured (and what blocks it), and what
   a graph buys on a static-shape decode forward over the same weights;
3. the host syncs of one decode step, by source line;
4. a profile of a decode step by model part, and the top ops.

`--tiny --device cpu` runs the same code on tiny shapes as a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import linecache
import statistics
import tempfile
import time
import traceback
import warnings
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from expertmesh.ernie.tiny import make_tiny
from expertmesh.router.attention_metadata import build_step
from expertmesh.router.engine import EngineConfig, LLMEngine
from expertmesh.router.gate import route
from expertmesh.router.model import MoEBlock
from expertmesh.router.sampling import SamplingParams
from torch.autograd.profiler import record_function
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

REAL = dict(hidden=2560, heads=20, kv_heads=4, head_dim=128, experts=64, top_k=6, shared=2,
            intermediate=12288, moe_intermediate=1536, vocab=103424)  # fmt: skip
TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, experts=8, top_k=2, shared=1,
            intermediate=256, moe_intermediate=64, vocab=None)  # fmt: skip
NOMINAL_BW = 3.35e12  # H100 SXM HBM3, bytes/s


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="expertmesh.cluster.cli.bench_gpu", description=__doc__)
    p.add_argument("--layers", type=int, default=4, help="layers (layer 0 dense, the rest MoE)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64], help="decode batches")
    p.add_argument("--shards", type=int, default=1, help="in-process expert shards")
    p.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--profile-steps", type=int, default=5, help="decode steps per profile")
    p.add_argument("--profile-batch", type=int, nargs="*", default=None,
                   help="batches to profile (default: the smallest and largest)")  # fmt: skip
    p.add_argument("--dtype", default="bfloat16", help="model dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--checkpoint", default=None, help="checkpoint dir: reused if it exists")
    p.add_argument("--top-ops", type=int, default=12, help="rows of the top-ops tables")
    return p.parse_args(argv)


def write_checkpoint(a: argparse.Namespace, tmp: str) -> Path:
    path = Path(a.checkpoint or Path(tmp) / "ckpt")
    if (path / "config.json").is_file():
        return path
    shapes = TINY if a.tiny else REAL
    return make_tiny(path, seed=0, layers=a.layers, dtype=a.dtype, shards=1, **shapes)


def make_sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_time(fn, n: int, sync) -> float:
    """Median seconds of fn() over n calls, synchronized before and after each."""
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, sync) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.randn(n // 4, device=device)  # [n bytes] fp32, not zeros
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * n / median_time(lambda: dst.copy_(src), 10, sync)


# -- decode driver -----------------------------------------------------------------------------


def start_batch(engine: LLMEngine, b: int, a: argparse.Namespace, max_tokens: int) -> None:
    """Add b requests of `context` random tokens and run their prefill."""
    g = torch.Generator().manual_seed(b)
    vocab = engine.model_cfg.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i in range(b):
        prompt = torch.randint(5, vocab, (a.context,), generator=g).tolist()
        engine.add_request(f"b{b}-{i}", prompt, params)
    while engine.scheduler.waiting or any(s.num_generated == 0 for s in engine.scheduler.running):
        engine.step()


def decode_inputs(engine: LLMEngine):
    """input_ids [B] and AttnMeta of the next decode step, without running it."""
    plan = engine.scheduler.schedule()
    assert all(s.num_tokens == 1 for s in plan), "not a pure decode step"
    return build_step(plan, engine.cfg.block_size, engine.device)


def step_bytes(engine: LLMEngine, meta, b: int) -> tuple[int, float]:
    """Bytes a decode step must read (weights, touched experts, KV) and experts per MoE layer.

    Call after a forward: the touched experts come from the last routing.
    """
    m, cfg = engine.model, engine.model_cfg
    unique = {p.data_ptr(): p for p in m.parameters()}  # tied weights counted once
    nbytes = sum(p.numel() * p.element_size() for p in unique.values())
    emb, lm = m.model.embed_tokens.weight, m.lm_head.weight
    if emb.data_ptr() != lm.data_ptr():  # only b rows of an untied embedding are read
        nbytes -= emb.numel() * emb.element_size()
    nbytes += b * emb.shape[1] * emb.element_size()
    touched = [torch.unique(ids).numel() for ids in m.routing()]
    elt = lm.element_size()
    nbytes += sum(touched) * 3 * cfg.hidden_size * cfg.moe_intermediate_size * elt
    keys = sum(int(g.mask.sum()) for g in meta.groups)  # context tokens attended, all sequences
    nbytes += keys * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elt
    return nbytes, statistics.mean(touched) if touched else 0.0


# -- a static-shape decode forward, for CUDA graphs -------------------------------------------


def static_experts(x, local, weights, w13, w2):
    """Routed experts with shapes fixed by the batch alone (no nonzero, no .tolist()).

    x: [B, H]; local: [B, k] local expert ids, -1 = elsewhere; weights: [B, k];
    w13: [E, 2I, H]; w2: [E, H, I]. Few pairs: gather their experts' weights (a copy);
    else run every local expert on every row (reads each expert once, as a batch does).
    """
    b, k = local.shape
    w = torch.where(local >= 0, weights, 0).to(x.dtype)  # [B, k]
    idx = local.clamp(min=0)  # [B, k]; the -1 slots weigh 0
    if 3 * b * k < w13.shape[0]:
        xs = x[:, None, :].expand(b, k, -1).reshape(b * k, -1, 1)  # [B*k, H, 1]
        gate, up = torch.bmm(w13[idx.flatten()], xs).squeeze(-1).chunk(2, -1)  # [B*k, I]
        y = torch.bmm(w2[idx.flatten()], (F.silu(gate) * up)[:, :, None])  # [B*k, H, 1]
        return (y.view(b, k, -1) * w[:, :, None]).sum(1)  # [B, H]
    dense = torch.zeros(b, w13.shape[0], dtype=x.dtype, device=x.device)
    dense.scatter_add_(1, idx, w)  # [B, E]
    gate, up = torch.matmul(x, w13.transpose(1, 2)).chunk(2, -1)  # [E, B, I]
    y = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))  # [E, B, H]
    return torch.einsum("ebh,be->bh", y, dense)


class StaticDecode:
    """The engine's decode forward over its own modules and shard weights, static shapes."""

    def __init__(self, engine: LLMEngine):
        self.model, self.kv = engine.model, engine.kv
        self.shards = [  # per shard: g2l, {layer: (w13 [E, 2I, H], w2 [E, H, I])}
            (s._held.g2l.to(engine.device), {layer: s.stacked(layer) for layer in s.weights})
            for s in engine.dispatcher.shards
        ]

    def _moe(self, mlp: MoEBlock, layer: int, h: torch.Tensor) -> torch.Tensor:
        bias = mlp.moe_statics.e_score_correction_bias
        weights, ids = route(h, mlp.gate.weight, bias, mlp.top_k, mlp.norm_min)  # [B, k]
        out = sum(static_experts(h, g2l[ids], weights, *w[layer]) for g2l, w in self.shards)
        return out if mlp.shared_experts is None else out + mlp.shared_experts(h)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, meta) -> torch.Tensor:
        m, (k_cache, v_cache) = self.model, self.kv
        x = m.model.embed_tokens(input_ids)  # [B, H]
        rope = m.rope(meta.positions)
        for i, layer in enumerate(m.model.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), rope, k_cache[i], v_cache[i], meta)
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            x = x + (self._moe(mlp, i, h) if isinstance(mlp, MoEBlock) else mlp(h))
        return m.lm_head(m.model.norm(x[meta.last_index])).float()  # [B, V]


def capture(fn):
    """A CUDA graph of fn() after warm-up on a side stream; returns (graph, static output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def capture_blocker(fn) -> str:
    """Try to capture fn(); the error and the first expertmesh line it came from."""
    try:
        capture(fn)
        return "captured"
    except Exception as e:  # the failure is the result
        while e is not None:  # the first error in our code, not capture_end's that follows it
            frames = [f for f in traceback.extract_tb(e.__traceback__) if _ours(f.filename)]
            if frames:
                f = frames[-1]
                msg = str(e).strip().splitlines()[0][:100]
                return f"blocked at {_site(f.filename, f.lineno)} `{_src(f)}`: {msg}"
            e = e.__cause__ or e.__context__
        return "blocked outside expertmesh code"


def _ours(filename: str) -> bool:
    return Path(filename).resolve().parent.name in ("router", "workers", "ernie")


# -- profile -----------------------------------------------------------------------------------

PARTS = [  # (profiler label, depth, what)
    ("step", 0, "engine step"),
    ("schedule", 1, "scheduler.schedule"),
    ("forward", 1, "model forward"),
    ("attention", 2, "attention"),
    ("dense_mlp", 2, "dense MLP (layer 0)"),
    ("moe", 2, "MoE blocks"),
    ("dispatch", 3, "dispatch: split rows + expert FFN"),
    ("expert_ffn", 4, "expert FFN (grouped_swiglu)"),
    ("combine", 3, "combine (index_add)"),
    ("shared", 3, "shared experts"),
    ("gate", 3, "gate/route (MoE - dispatch - combine - shared)"),
    ("lm_head", 2, "lm_head"),
    ("count_routing", 1, "count_routing (bincount on CPU)"),
    ("update", 1, "sample + update (CPU)"),
    ("host_other", 1, "other host (build_step, logits.cpu(), ...)"),
]
LABELS = {k for k, _, _ in PARTS}


@contextlib.contextmanager
def labelled(engine: LLMEngine):
    """Profiler ranges around the model's parts (hooks and instance wrappers, undone after)."""
    with contextlib.ExitStack() as stack:

        def hook(module, name):
            ranges = []

            def enter(*_):
                ranges.append(record_function(name))
                ranges[-1].__enter__()

            def leave(*_):
                ranges.pop().__exit__(None, None, None)

            pre, post = module.register_forward_pre_hook(enter), module.register_forward_hook(leave)
            stack.callback(pre.remove)
            stack.callback(post.remove)

        def wrap(obj, attr, name):
            fn = getattr(obj, attr)

            def wrapped(*args, **kwargs):
                with record_function(name):
                    return fn(*args, **kwargs)

            setattr(obj, attr, wrapped)
            stack.callback(delattr, obj, attr)

        m = engine.model
        hook(m, "forward")
        hook(m.lm_head, "lm_head")
        for layer in m.model.layers:
            hook(layer.self_attn, "attention")
            if isinstance(layer.mlp, MoEBlock):
                hook(layer.mlp, "moe")
                if layer.mlp.shared_experts is not None:
                    hook(layer.mlp.shared_experts, "shared")
            else:
                hook(layer.mlp, "dense_mlp")
        wrap(engine.scheduler, "schedule", "schedule")
        wrap(engine.dispatcher, "dispatch", "dispatch")
        wrap(engine.dispatcher, "combine", "combine")
        for shard in engine.dispatcher.shards:
            wrap(shard, "forward", "expert_ffn")
        wrap(engine, "_count_routing", "count_routing")
        wrap(engine, "_update", "update")
        yield


def profile_steps(engine: LLMEngine, steps: int, cuda: bool):
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    engine.step()  # warm
    with labelled(engine), profile(activities=acts) as prof:
        for _ in range(steps):
            with record_function("step"):
                engine.step()
    return prof


def part_times(prof, steps: int) -> dict[str, tuple[float, float, int]]:
    """label -> (CPU ms, GPU kernel ms, calls) per step."""
    out = {k: [0.0, 0.0, 0] for k in LABELS}
    for e in prof.events():
        if e.name in LABELS and e.device_type == torch.autograd.DeviceType.CPU:
            r = out[e.name]
            r[0] += e.cpu_time_total / 1e3 / steps
            r[1] += e.device_time_total / 1e3 / steps
            r[2] += 1
    c = {k: (v[0], v[1]) for k, v in out.items()}
    sub = [c["dispatch"], c["combine"], c["shared"]]
    c["gate"] = tuple(c["moe"][i] - sum(s[i] for s in sub) for i in range(2))
    host = [c["schedule"], c["forward"], c["count_routing"], c["update"]]
    c["host_other"] = tuple(c["step"][i] - sum(s[i] for s in host) for i in range(2))
    return {k: (*c[k], out[k][2] // steps) for k in c}


def runtime_counts(prof, steps: int) -> dict[str, float]:
    """GPU busy ms, kernel launches, stream syncs and memcpys per step."""
    busy, counts = 0.0, Counter()
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:
            busy += 0 if e.name in LABELS else e.device_time_total / 1e3
        elif "LaunchKernel" in e.name:
            counts["launches"] += 1
        elif "Synchronize" in e.name:
            counts["syncs"] += 1
        elif "Memcpy" in e.name:
            counts["memcpys"] += 1
    return {"gpu_ms": busy / steps, **{k: v / steps for k, v in counts.items()}}


def top_ops(prof, steps: int, n: int, cuda: bool) -> list[tuple[str, float, float, float]]:
    """(op, calls, self GPU ms, self CPU ms) per step, aten-level, by GPU (else CPU) time."""
    rows = [
        (e.key, e.count / steps, e.self_device_time_total / 1e3 / steps,
         e.self_cpu_time_total / 1e3 / steps)
        for e in prof.key_averages()
        if e.key not in LABELS and e.device_type == torch.autograd.DeviceType.CPU
    ]  # fmt: skip
    return sorted(rows, key=lambda r: r[2] if cuda else r[3], reverse=True)[:n]


def sync_sites(engine: LLMEngine) -> Counter:
    """Synchronizing CUDA calls of one engine step, by the innermost line of ours making them."""
    sites = Counter()

    def record(message, *_):
        ours = [f for f in traceback.extract_stack() if _ours(f.filename)]
        if "synchroniz" in str(message).lower() and ours:  # not: toggling the debug mode
            sites[_site(ours[-1].filename, ours[-1].lineno)] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def _site(filename: str, lineno: int) -> str:
    return f"{'/'.join(Path(filename).parts[-2:])}:{lineno}"


def _src(frame) -> str:
    return (frame.line or "").strip()[:70]


# -- one batch size ----------------------------------------------------------------------------


def bench_batch(engine: LLMEngine, b: int, a, sync, cuda: bool, profile_it: bool) -> dict:
    start_batch(engine, b, a, max_tokens=a.warmup + 2 * a.steps + a.profile_steps + 16)
    for _ in range(a.warmup):
        engine.step()
    r = {"batch": b, "step": median_time(engine.step, a.steps, sync)}
    if cuda:  # the same steps with SDPA's cuDNN backend off (efficient or math kernels)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            engine.step()
            r["step_no_cudnn"] = median_time(engine.step, a.steps, sync)
    ids, meta = decode_inputs(engine)

    def fwd():
        return engine.model(ids, meta, engine.kv, engine.dispatcher)

    ref = fwd()
    r["bytes"], r["touched"] = step_bytes(engine, meta, b)
    r["finite"] = bool(torch.isfinite(ref).all())
    r["forward"] = median_time(fwd, a.steps, sync)

    static, smeta = StaticDecode(engine), meta  # a decode step's meta: no bool indexing
    out = static(ids, smeta)
    r["err"] = float((out - ref).norm() / ref.norm())
    r["agree"] = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    r["static"] = median_time(lambda: static(ids, smeta), a.steps, sync)
    if cuda:
        try:
            graph, _ = capture(lambda: static(ids, smeta))
            r["graph"] = median_time(graph.replay, 3 * a.steps, sync)
        except RuntimeError as e:
            print(f"- batch {b}: capturing the static forward failed: {e}")
    if profile_it:
        try:
            prof = profile_steps(engine, a.profile_steps, cuda)
            r["parts"] = part_times(prof, a.profile_steps)
            r["runtime"] = runtime_counts(prof, a.profile_steps)
            r["top"] = top_ops(prof, a.profile_steps, a.top_ops, cuda)
            r["syncs"] = sync_sites(engine) if cuda else Counter()
        except Exception as e:  # keep the other numbers
            print(f"- batch {b}: profiling failed: {type(e).__name__}: {e}")
            r.pop("parts", None)
    for rid in list(engine.requests):
        engine.abort(rid)
    return r


# -- printing ----------------------------------------------------------------------------------


def print_decode(rows: list[dict], layers: int, bw: float) -> None:
    print("\n## Decode step vs the HBM roofline (medians)\n")
    print("| batch | engine step ms | tok/s | step ms, SDPA w/o cuDNN | tok/s | "
          "model forward ms | forward ms / layer | "
          "experts touched / MoE layer | bytes read / step MB | roofline ms (measured BW) | "
          "roofline ms (3.35 TB/s) | fraction of roofline: step | : forward |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        roof, nominal = r["bytes"] / bw, r["bytes"] / NOMINAL_BW
        print(
            f"| {r['batch']} | {1e3 * r['step']:.2f} | {r['batch'] / r['step']:.0f} | "
            f"{_ms_tps(r.get('step_no_cudnn'), r['batch'])} | "
            f"{1e3 * r['forward']:.2f} | {1e3 * r['forward'] / layers:.2f} | "
            f"{r['touched']:.1f} | {r['bytes'] / 1e6:.0f} | {1e3 * roof:.3f} | "
            f"{1e3 * nominal:.3f} | {roof / r['step']:.3f} | {roof / r['forward']:.3f} |"
        )


def _ms_tps(sec: float | None, b: int) -> str:
    return f"{1e3 * sec:.2f} | {b / sec:.0f}" if sec else "- | -"


def print_graphs(rows: list[dict], cuda: bool) -> None:
    print("\n## CUDA graphs: static-shape decode forward over the engine's weights\n")
    print("| batch | engine forward ms | static eager ms | static graph ms | graph vs static "
          "eager | graph vs engine forward | rel. err vs engine logits | same argmax |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = r.get("graph")
        gs = (
            f"{1e3 * g:.2f} | {r['static'] / g:.2f}x | {r['forward'] / g:.2f}x"
            if g
            else "- | - | -"
        )
        print(
            f"| {r['batch']} | {1e3 * r['forward']:.2f} | {1e3 * r['static']:.2f} | {gs} | "
            f"{r['err']:.2e} | {100 * r['agree']:.0f}% |"
        )
    print(
        "\n(Static: a decode step's AttnMeta (no bool indexing); few pairs gather their experts, else all"
    )
    print("experts run on all rows. Error: bf16 sum order; a flipped near-tie expert moves a row.)")


def print_profiles(rows: list[dict], cuda: bool) -> None:
    prof = [r for r in rows if "parts" in r]
    if not prof:
        return
    print("\n## Host vs GPU per decode step (profiled; the profiler adds CPU time)\n")
    print("| batch | step ms (unprofiled) | GPU busy ms | GPU idle | kernel launches | "
          "stream syncs | memcpys |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in prof:
        rt, step = r["runtime"], 1e3 * r["step"]
        idle = f"{100 * (1 - rt['gpu_ms'] / step):.0f}%" if cuda else "-"
        print(
            f"| {r['batch']} | {step:.2f} | {rt['gpu_ms']:.2f} | {idle} | "
            f"{rt.get('launches', 0):.0f} | {rt.get('syncs', 0):.0f} | {rt.get('memcpys', 0):.0f} |"
        )
    head = " | ".join(f"B={r['batch']} CPU ms | B={r['batch']} GPU ms" for r in prof)
    print(f"\n## Decode step by part, per step (inclusive; calls per step)\n\n| part | {head} |")
    print("|---|" + "---|---|" * len(prof))
    for key, depth, what in PARTS:
        cells = " | ".join(f"{p['parts'][key][0]:.2f} | {p['parts'][key][1]:.2f}" for p in prof)
        calls = prof[0]["parts"][key][2]
        print(f"| {'. ' * depth}{what}{f' (x{calls})' if calls > 1 else ''} | {cells} |")
    for r in prof:
        print(f"\n## Top ops, batch {r['batch']} (self time per step)\n")
        print("| op | calls | GPU ms | CPU ms |\n|---|---|---|---|")
        for op, calls, gpu, cpu in r["top"]:
            print(f"| `{op}` | {calls:.0f} | {gpu:.3f} | {cpu:.3f} |")
    if cuda:
        sites = sorted(set().union(*(r["syncs"] for r in prof)))
        head = " | ".join(f"B={r['batch']}" for r in prof)
        print(f"\n## Host syncs in one decode step, by line\n\n| line | code | {head} |")
        print("|---|---|" + "---|" * len(prof))
        for s in sorted(sites, key=lambda s: -prof[-1]["syncs"][s]):
            file, line = s.rsplit(":", 1)
            code = _code_line(file, int(line))
            print(f"| {s} | `{code}` | " + " | ".join(str(r["syncs"][s]) for r in prof) + " |")


def _code_line(short: str, lineno: int) -> str:
    import expertmesh.router.engine as eng

    root = Path(eng.__file__).resolve().parent.parent
    return linecache.getline(str(root / short), lineno).strip()[:70]


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    device = torch.device(a.device)
    cuda, sync = device.type == "cuda", make_sync(device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = write_checkpoint(a, tmp)
        t1 = time.perf_counter()
        cfg = EngineConfig(dtype=a.dtype, device=a.device, max_num_seqs=max(a.batch))
        engine = LLMEngine.from_checkpoint(path, cfg, num_shards=a.shards)
        t2 = time.perf_counter()
    bw = copy_bandwidth(device, sync)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    m, mc = engine.model, engine.model_cfg
    tied = m.model.embed_tokens.weight.data_ptr() == m.lm_head.weight.data_ptr()
    print(f"# bench_gpu: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), {a.dtype}, {'tiny' if a.tiny else 'real'}"
          f" shapes, layers={mc.num_layers} (MoE: {list(mc.moe_layers)}), experts={mc.num_experts}"
          f" top-{mc.top_k}, shards={a.shards}, context={a.context}\n")  # fmt: skip
    print(f"- checkpoint written (or found) in {t1 - t0:.0f} s, loaded in {t2 - t1:.0f} s")
    print(f"- device-to-device copy: {bw / 1e12:.2f} TB/s measured (read + write); "
          f"nominal HBM {NOMINAL_BW / 1e12:.2f} TB/s")  # fmt: skip
    print(f"- embed_tokens and lm_head share storage on the device: {'yes' if tied else 'no'}")
    pb = a.profile_batch if a.profile_batch is not None else sorted({min(a.batch), max(a.batch)})
    rows = [bench_batch(engine, b, a, sync, cuda, b in pb) for b in a.batch]
    print(f"- logits finite: {all(r['finite'] for r in rows)}")
    print_decode(rows, mc.num_layers, bw)
    print_graphs(rows, cuda)
    print_profiles(rows, cuda)
    if cuda:  # last: a failed capture may leave the device in a state best not timed after
        start_batch(engine, 1, a, max_tokens=4)
        ids, meta = decode_inputs(engine)
        print("\n## Capturing the engine's own forward (`GatewayModel.forward`, batch 1)\n")
        fwd = partial(engine.model, ids, meta, engine.kv, engine.dispatcher)
        print(f"- build_step's AttnMeta: {capture_blocker(fwd)}")
    engine.close()
    return rows


if __name__ == "__main__":
    main()

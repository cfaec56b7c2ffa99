"""Prometheus metrics of the HTTP ingress, plus the gateway's state at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _ExpertCounts:
    """Exposes the gateway's per-expert routing counts (read at scrape time) as counters."""

    def __init__(self):
        self.snapshot: dict = {"layers": [], "counts": []}

    def collect(self):
        fam = CounterMetricFamily(
            "expertmesh_expert_routed_tokens",
            "Tokens routed to each expert in each MoE layer since the gateway started; VL models"
            " number vision experts after the text experts, as their checkpoints do",
            labels=["layer", "expert", "modality"],
        )
        text = self.snapshot.get("text_experts")
        for layer, row in zip(self.snapshot["layers"], self.snapshot["counts"]):
            for expert, n in enumerate(row):
                modality = "vision" if text is not None and expert >= text else "text"
                fam.add_metric([str(layer), str(expert), modality], n)
        yield fam


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "expertmesh_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "expertmesh_time_to_first_token_seconds",
            "Time from request to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "expertmesh_inter_token_latency_seconds",
            "Time between consecutive tokens of a stream",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "expertmesh_prompt_tokens", "Prompt tokens taken in", registry=r
        )
        self.generation_tokens = Counter(
            "expertmesh_generation_tokens", "Tokens generated", registry=r
        )
        self.running = Gauge(
            "expertmesh_requests_running", "Requests in the running batch", registry=r
        )
        self.waiting = Gauge(
            "expertmesh_requests_waiting", "Requests waiting for a batch slot", registry=r
        )
        self.gateways = Gauge(
            "expertmesh_gateways", "Gateway replicas that answered (sums are over them)", registry=r
        )
        self.experts = _ExpertCounts()
        r.register(self.experts)

    def render(self, stats: dict, expert_counts: dict) -> bytes:
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        self.gateways.set(stats.get("gateways", 1))
        self.experts.snapshot = expert_counts
        return generate_latest(self.registry)

"""Prometheus metrics: requests by outcome, latencies, token counts, and the engine's gauges."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ENGINE_GAUGES = {"slots_in_use": "decode slots holding a request", "queue_length": "requests waiting for a slot",
                  "cache_bytes": "bytes of the engine's KV cache"}


class _EngineCollector:
    """Reads the engine's stats() at each scrape (so the gauges are never stale)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.stats = stats

    def collect(self) -> Any:
        try:
            stats = self.stats()
        except Exception:  # a dead engine still gets scraped
            stats = {}
        for key, doc in _ENGINE_GAUGES.items():
            family = GaugeMetricFamily(f"gptoss_{key}", doc)
            if key in stats:
                family.add_metric([], float(stats[key]))
            yield family


class Metrics:
    """The server's metrics in their own registry (several apps in one process do not collide)."""

    def __init__(self, engine_stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gptoss_requests", "finished requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.ttft = Histogram("gptoss_time_to_first_token_seconds", "submit to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("gptoss_time_per_output_token_seconds", "mean time between generated tokens",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("gptoss_request_seconds", "submit to the last token", buckets=_LATENCY_BUCKETS,
                                 registry=r)
        self.prompt_tokens = Counter("gptoss_prompt_tokens", "prompt tokens of submitted requests", registry=r)
        self.cached_tokens = Counter("gptoss_cached_prompt_tokens", "prompt tokens found in the prefix cache",
                                     registry=r)
        self.generated_tokens = Counter("gptoss_generated_tokens", "tokens generated", registry=r)
        self.running = Gauge("gptoss_requests_running", "requests being served now", registry=r)
        r.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def outcome(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint, outcome).inc()


@dataclass
class Timing:
    """One request's latencies, reported to the metrics when it ends."""

    metrics: Metrics
    endpoint: str
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    reported: bool = False

    def tokens_arrived(self, n: int) -> None:
        if n:
            now = time.perf_counter()
            self.first = self.first or now
            self.last, self.tokens = now, self.tokens + n

    def finish(self, outcome: str, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        """Counts the request once, under ``outcome`` (stop, length, tool_calls, cancelled, error, ...)."""
        if self.reported:
            return
        self.reported = True
        m = self.metrics
        m.outcome(self.endpoint, outcome)
        m.prompt_tokens.inc(prompt_tokens)
        m.cached_tokens.inc(cached_tokens)
        m.generated_tokens.inc(self.tokens)
        if self.first is not None and self.last is not None:
            m.ttft.observe(self.first - self.start)
            m.latency.observe(self.last - self.start)
            if self.tokens > 1:
                m.tpot.observe((self.last - self.first) / (self.tokens - 1))

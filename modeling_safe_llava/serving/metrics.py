"""`GET /metrics`: the server's Prometheus metrics, in a registry of its own (so that two apps in one process, as in
tests, never share counters).

- `safe_llava_requests_total{endpoint, status}`: requests answered.
- `safe_llava_verdicts_total{endpoint, category, action}`: verdicts given (`category` is `not_judged` when nothing was
  judged).
- `safe_llava_request_latency_seconds{endpoint}`: time from the request to its last byte.
- `safe_llava_time_to_first_token_seconds`: streamed chat, time from the request to its first content delta.
- `safe_llava_queue_depth`: requests waiting for a model call.
- `safe_llava_batch_size{kind}`: rows per model call (`chat`, `stream`, `moderation`).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServingMetrics:
    """The metrics of one server; `render()` gives the text `/metrics` answers."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "safe_llava_requests", "Requests answered", ["endpoint", "status"], registry=self.registry
        )
        self.verdicts = Counter(
            "safe_llava_verdicts", "Safety verdicts given", ["endpoint", "category", "action"], registry=self.registry
        )
        self.latency = Histogram(
            "safe_llava_request_latency_seconds", "Request latency", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "safe_llava_time_to_first_token_seconds", "Streamed chat: time to the first content delta",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge("safe_llava_queue_depth", "Requests waiting for a model call", registry=self.registry)
        self.batch_size = Histogram(
            "safe_llava_batch_size", "Rows per model call", ["kind"], buckets=BATCH_BUCKETS, registry=self.registry
        )

    def track_queue_depth(self, depth: Callable[[], int]):
        """Reads the queue depth from `depth()` at each scrape."""
        self.queue_depth.set_function(depth)

    def observe_request(self, endpoint: str, status: int, seconds: float):
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_verdict(self, endpoint: str, safety: dict):
        category = safety.get("category_name", "not_judged") if safety.get("judged") else "not_judged"
        action = safety.get("action", "allow") if safety.get("judged") else "not_judged"
        self.verdicts.labels(endpoint=endpoint, category=category, action=action).inc()

    def observe_batch(self, kind: str, size: int):
        self.batch_size.labels(kind=kind).observe(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServingMetrics"]

"""Prometheus metrics of one engine (own registry, so several engines can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Requests (errors are `status="error"`), latency histogram and ready replicas."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bioengine_requests", "Inference requests", ["model", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "bioengine_request_latency_seconds",
            "Inference latency",
            ["model"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.replicas_ready = Gauge(
            "bioengine_replicas_ready", "Replicas accepting requests", registry=self.registry
        )
        self.replicas_target = Gauge(
            "bioengine_replicas_target", "Replicas the engine keeps now", registry=self.registry
        )
        self.autoscale_decisions = Counter(
            "bioengine_autoscale_decisions",
            "Autoscaler decisions by kind (up, down, from_zero, to_zero, manual)",
            ["kind"],
            registry=self.registry,
        )

    def observe(self, model: str, status: str, seconds: float) -> None:
        """Record one request."""
        self.requests.labels(model, status).inc()
        self.latency.labels(model).observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)

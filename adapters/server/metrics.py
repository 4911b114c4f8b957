"""Prometheus metrics of one server (its own registry, so that servers in one process and
tests never share counts)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    """What the server counts: requests by status, guarded calls by mode used, fallbacks,
    refusals, store lookups, latency and queue time, tokens."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "guardrail_requests", "HTTP requests by app and status", ["app", "status"], registry=r
        )
        self.calls = Counter(
            "guardrail_calls", "model calls by app and mode used", ["app", "mode_used"], registry=r
        )
        self.fallbacks = Counter(
            "guardrail_fallbacks", "fallbacks recorded in decisions", ["app"], registry=r
        )
        self.refusals = Counter(
            "guardrail_refusals", "calls refused by the guard", ["app", "error"], registry=r
        )
        self.lookups = Counter(
            "guardrail_store_lookups",
            "dataset-level shift lookups by result",
            ["app", "result"],
            registry=r,
        )
        self.latency = Histogram(
            "guardrail_request_seconds",
            "request latency",
            ["app"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "guardrail_queue_seconds",
            "time a non-streamed call waited for a worker before its model call",
            ["app"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "guardrail_tokens", "tokens by app and kind", ["app", "kind"], registry=r
        )

    def decision(self, app: str, safety: dict[str, Any]) -> None:
        """Count one call's decision record."""
        mode = str(safety.get("mode_used"))
        if mode == "refused":
            return
        self.calls.labels(app, mode).inc()
        fallbacks = safety.get("fallbacks") or []
        if fallbacks:
            self.fallbacks.labels(app).inc(len(fallbacks))
        if safety.get("shift_level") == "dataset":
            self.lookups.labels(app, "found").inc()
        elif any("no dataset-level shift" in str(note) for note in fallbacks):
            self.lookups.labels(app, "missing").inc()

    def refusal(self, app: str, error: str) -> None:
        self.refusals.labels(app, error).inc()

    def usage(self, app: str, prompt: int, completion: int) -> None:
        self.tokens.labels(app, "prompt").inc(prompt)
        self.tokens.labels(app, "completion").inc(completion)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

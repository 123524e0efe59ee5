"""Prometheus metrics of one API process.

A registry per app (not the global one) so several apps can live in one process (tests, bench)
without duplicate-metric errors. Per-job timings come from the worker (``JobResult.timings``), so
queue wait, compute and encode are measured where they happen, not guessed from the outside.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "imgsvc_http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "imgsvc_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.image_seconds = Histogram(
            "imgsvc_image_latency_seconds",
            "End-to-end latency of one successful synchronous image request (upload to response).",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "imgsvc_queue_wait_seconds",
            "Time a job waited in the stream before a worker took it (worker-measured).",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "imgsvc_compute_seconds",
            "Forward-pass time of the batch that produced a job (worker-measured).",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.encode = Histogram(
            "imgsvc_encode_seconds",
            "Time to encode a job's output image (worker-measured).",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            "imgsvc_decode_seconds",
            "Time the API spent validating and decoding an upload.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "imgsvc_batch_size",
            "Size of the worker batch each job ran in.",
            ["op"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.jobs = Counter(
            "imgsvc_jobs_total",
            "Jobs by operation and outcome (ok, failed, timeout, rejected, redis_error).",
            ["op", "outcome"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "imgsvc_queue_depth",
            "Jobs in the stream (queued or in flight), sampled at enqueue and at scrape time.",
            registry=r,
        )
        self.workers = Gauge(
            "imgsvc_live_workers", "Workers with a live heartbeat, sampled at scrape.", registry=r
        )
        self.redis_up = Gauge(
            "imgsvc_redis_up", "1 if Redis answered the last scrape's ping, else 0.", registry=r
        )

    def observe_timings(self, op: str, timings: dict[str, float]) -> None:
        for key, histogram in (
            ("queue", self.queue_wait),
            ("compute", self.compute),
            ("encode", self.encode),
            ("batch_size", self.batch_size),
        ):
            value = timings.get(key)
            if isinstance(value, int | float) and value >= 0:
                histogram.labels(op).observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts requests by route *template* (never the raw path: job ids would explode labels)."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, scope.get("method", ""), str(status)).inc()
            self.metrics.request_seconds.labels(template).observe(time.perf_counter() - started)

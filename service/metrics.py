"""Prometheus metrics of one API process, and the middleware that measures and logs requests.

A registry per app (not the global one) so several apps can live in one process (tests, bench)
without duplicate-metric errors. Per-job timings come from the worker (``JobResult.timings``), so
queue wait, compute and encode are measured where they happen, not guessed from the outside.

Jobs are counted by operation, model and mode: synchronous ones when they are answered,
asynchronous ones when accepted (``outcome="accepted"``) and again when their final answer is
first fetched from ``GET /jobs/{id}`` (once per job across replicas, ``JobQueue.first_report``),
with their end-to-end latency from submission to the worker's finish. Model labels are only ever
names from the zoo manifest: an unknown name in a request is never a label value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from jobqueue.telemetry import log_context, request_id_from

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JOB_STATE = "imgsvc_job"
"""Key in the request's ASGI ``state``: what the endpoint learnt about the job (id, model, op),
for the access log line."""

access_log = logging.getLogger("service.access")


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "imgsvc_http_requests_total",
            "HTTP requests by route template, method and status code (499: the client went "
            "away before the answer; 408: it was too slow to send the request).",
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
            "End-to-end latency of one successful image job: upload to response (sync), "
            "submission to the worker's finish (async).",
            ["op", "model", "mode"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "imgsvc_queue_wait_seconds",
            "Time a job waited in its lane before a worker took it (worker-measured).",
            ["op", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "imgsvc_compute_seconds",
            "Forward-pass time of the batch that produced a job (worker-measured).",
            ["op", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.encode = Histogram(
            "imgsvc_encode_seconds",
            "Time to encode a job's output image (worker-measured).",
            ["op", "model"],
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
            "Jobs by operation, model, mode (sync, async) and outcome (accepted, ok, failed, "
            "timeout, cancelled, client_gone, rejected (queue full), busy (queue wait past the "
            "timeout), too_expensive).",
            ["op", "model", "mode", "outcome"],
            registry=r,
        )
        self.estimated_cost = Histogram(
            "imgsvc_job_estimated_cost_seconds",
            "Estimated compute time of admitted jobs (output megapixels x measured cost).",
            ["op", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "imgsvc_queue_depth",
            "Jobs in the lanes (queued or in flight), sampled at enqueue and at scrape time.",
            registry=r,
        )
        self.workers = Gauge(
            "imgsvc_live_workers", "Workers with a live heartbeat, sampled at scrape.", registry=r
        )
        self.redis_up = Gauge(
            "imgsvc_redis_up", "1 if Redis answered the last scrape's ping, else 0.", registry=r
        )
        self.decodes_in_progress = Gauge(
            "imgsvc_decodes_in_progress", "Uploads being decoded now.", registry=r
        )

    def observe_timings(self, op: str, model: str, timings: dict[str, float]) -> None:
        for key, histogram in (
            ("queue", self.queue_wait),
            ("compute", self.compute),
            ("encode", self.encode),
        ):
            value = timings.get(key)
            if isinstance(value, int | float) and value >= 0:
                histogram.labels(op, model).observe(value)
        batch = timings.get("batch_size")
        if isinstance(batch, int | float) and batch >= 0:
            self.batch_size.labels(op).observe(batch)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMiddleware:
    """Per request: the request id (from ``X-Request-ID`` / ``traceparent`` or new) in the log
    context and echoed in the response; the request counted by route *template* (never the raw
    path: job ids would explode labels); one access log line with status, latency, job id and
    model."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = request_id_from(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                elapsed = time.perf_counter() - started
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                self.metrics.requests.labels(template, scope.get("method", ""), str(status)).inc()
                self.metrics.request_seconds.labels(template).observe(elapsed)
                job = scope.get("state", {}).get(JOB_STATE) or {}
                client = scope.get("client")
                access_log.info(
                    "%s %s %d %.1f ms",
                    scope.get("method", ""),
                    scope.get("path", ""),
                    status,
                    elapsed * 1000,
                    extra={
                        "method": scope.get("method", ""),
                        "path": scope.get("path", ""),
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "client": f"{client[0]}:{client[1]}" if client else "",
                        **job,
                    },
                )

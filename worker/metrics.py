"""Prometheus metrics of one worker, served on the worker's own port (``METRICS_PORT``).

The API's ``/metrics`` sees jobs from the outside (latency, outcome); only the worker sees how
its batches went: jobs per batch, forward-pass and batch compute time, queue wait, jobs stopped
because nobody waited for them, preemptions of big jobs by small ones, its measured cost per
model, and its memory (process RSS from prometheus-client's process collector; CUDA memory where
a GPU is used). A registry per worker (not the global one) keeps the endpoint to these and lets
tests build several workers in one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

log = logging.getLogger(__name__)

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        self.jobs = Counter(
            "imgsvc_worker_jobs_total",
            "Jobs this worker finished, by model and outcome (ok, failed, cancelled, expired, "
            "dead_lettered).",
            ["model", "outcome"],
            registry=r,
        )
        self.batch_size = Histogram(
            "imgsvc_worker_batch_size", "Jobs computed together in one batch.", buckets=_BATCH,
            registry=r,
        )  # fmt: skip
        self.batch_windows = Counter(
            "imgsvc_worker_batch_windows_total",
            "Batches by what their wait for batch-mates did (BATCH_WINDOW): caught (a job "
            "joined), fruitless (waited, nobody came), skipped (the adaptive window was closed), "
            "backlog (the first read found several jobs).",
            ["outcome"],
            registry=r,
        )
        self.pass_seconds = Histogram(
            "imgsvc_worker_forward_pass_seconds",
            "Time of one forward pass (a whole image, a group of images or one tile), measured "
            "between the engine's pass boundaries; model 'mixed' when a batch had several.",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "imgsvc_worker_batch_compute_seconds",
            "Compute time of one batch (all its passes; small jobs run inside a big one's "
            "preemption points excluded).",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "imgsvc_worker_queue_wait_seconds",
            "Time from enqueue to the start of computing, per job.",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.encode_seconds = Histogram(
            "imgsvc_worker_encode_seconds", "Time to encode one result.", ["model"],
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.stopped = Counter(
            "imgsvc_worker_stopped_jobs_total",
            "Running jobs stopped between forward passes because nobody waited for them.",
            ["model", "reason"],
            registry=r,
        )
        self.preemptions = Counter(
            "imgsvc_worker_preemptions_total",
            "Times a bulk job paused between forward passes to compute interactive jobs.",
            registry=r,
        )
        self.cost = Gauge(
            "imgsvc_worker_seconds_per_megapixel",
            "This worker's measured compute cost per output megapixel (what admission uses).",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "imgsvc_worker_jobs_in_flight", "Jobs read and not yet acknowledged.", registry=r
        )
        self.gpu_memory = Gauge(
            "imgsvc_worker_gpu_memory_bytes",
            "CUDA memory of this process (allocated, reserved, peak allocated); absent on CPU.",
            ["kind"],
            registry=r,
        )

    def watch_gpu(self, read: Callable[[str], float]) -> None:
        """Sample CUDA memory at scrape time (``read(kind)``)."""
        for kind in ("allocated", "reserved", "peak"):
            self.gpu_memory.labels(kind).set_function(lambda kind=kind: read(kind))

    def serve(self, host: str, port: int) -> bool:
        """Expose the registry over HTTP; a busy port is logged, not fatal (a second worker on
        one host must still serve jobs)."""
        if port == 0:
            return False
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.warning("metrics endpoint %s:%d unavailable (%s); serving jobs without it",
                        host, port, exc)  # fmt: skip
            return False
        log.info("metrics on http://%s:%d/metrics", host, port)
        return True

"""Bounded work per request, end to end: uvicorn + ``python -m worker`` + redis-server, tiny zoo
(issue 15, defect 1 and the observability of the worker).

Before: a small upload of a large image held the only CPU worker for minutes, small requests
sent meanwhile got 504, and a job whose caller had given up (504, disconnected) was computed to
the end. Now the worker measures its cost per model; the API refuses a synchronous job that
cannot finish in time (413 naming the limit) and lanes big async jobs; a running big job pauses
between forward passes for small ones; and a job nobody waits for any more is stopped there.

The worker tiles at 128 px here, so a big image is many forward passes (many stop points), and
checks cancel markers every 50 ms.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from imgsvc_client import Client, QueueFull, RetryPolicy
from jobqueue.protocol import Job, JobResult, JobStatus, Keys, ModelCost
from service.launch import Child, free_port, start_api, start_worker, wait_http

from .conftest import wait_costs_measured
from .test_api_abuse import metric

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PREFIX = "limits"
REQUEST_TIMEOUT_S = 3.0  # sync budget: ADMISSION_HEADROOM (0.5) x 3 s = 1.5 s of compute


@dataclass
class Stack:
    url: str
    worker_metrics: str
    redis_url: str
    keys: Keys
    api: Child
    worker: Child
    logdir: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60, **kwargs})

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def worker_records(self) -> list[dict[str, Any]]:
        records = []
        for line in (self.logdir / "worker.log").read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.logdir.glob("*.log"))
        )


@pytest.fixture(scope="module")
def stack(
    redis_instance: Any, tiny_zoo_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    logdir = tmp_path_factory.mktemp("limits")
    port, metrics_port = free_port(), free_port()
    base = {
        **os.environ,
        "REDIS_URL": redis_instance.url,
        "QUEUE_PREFIX": PREFIX,
        "MODEL_ZOO_DIR": str(tiny_zoo_template),
        "PYTHONUNBUFFERED": "1",
        "HEARTBEAT_INTERVAL_S": "0.5",
        "CLAIM_IDLE_MS": "5000",
    }
    api_env = {
        **base,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        "WAIT_CHUNK_S": "0.2",
        "REDIS_TIMEOUT_S": "2",
        "BULK_LANE_COST_S": "0.5",
    }
    worker_env = {
        **base,
        "DEVICE": "cpu",
        "PRECISION": "fp32",
        "TORCH_THREADS": "1",
        "MAX_BATCH": "4",
        "MAX_WAIT_MS": "10",
        "TILE_SIZE": "128",
        "WHOLE_MAX_PIXELS": "0",  # big images are many tile passes here, in every runtime
        "TILE_STATS_SIZE": "256",
        "STOP_CHECK_INTERVAL_S": "0.05",
        "COST_PROBE_SIDE": "256",
        # Tiled images are measured at 4 x the 128 px threshold: many tiles, as in the big
        # jobs below, rather than the overlap-heavy few just above it.
        "COST_PROBE_TILED_SCALE": "4",
        "METRICS_PORT": str(metrics_port),
        "WORKER_ID": "limits-worker",
    }
    with open(logdir / "api.log", "ab") as api_log, open(logdir / "worker.log", "ab") as w_log:
        api = start_api(api_env, output=api_log, cwd=str(REPO))
        worker = start_worker(worker_env, output=w_log, cwd=str(REPO))
        service = Stack(
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.1:{metrics_port}/metrics",
            redis_instance.url,
            Keys(PREFIX),
            api,
            worker,
            logdir,
        )
        try:
            wait_http(service.url + "/readyz", 180, [api, worker])
            wait_costs_measured(service.url, 180)
            yield service
        except BaseException:
            print(service.logs())
            raise
        finally:
            worker.stop(30)
            api.stop(30)


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A random picture of 8x8-pixel blocks: the model's cost depends on the size only, and
    blocks keep a 4096-px upload (sized from a fast CPU's cost) under the 20 MB upload limit,
    which per-pixel noise (50 MB at that size) would not."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    pixels = blocks.repeat(8, axis=0).repeat(8, axis=1)[:height, :width]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def cost(stack: Stack, model: str) -> ModelCost:
    raw = stack.redis().hget(stack.keys.costs, model)
    assert raw is not None, "the worker published no cost"
    return ModelCost.decode(raw)


def side_for(stack: Stack, model: str, seconds: float) -> int:
    """The side of a square style input the API will estimate at ``seconds`` (with the tiled
    figure where that side is tiled)."""
    measured = cost(stack, model)
    side = math.ceil(math.sqrt(seconds / measured.seconds_per_megapixel * 1e6))
    if measured.tiled(side, side):
        per_mpx = measured.seconds_per_megapixel_at(side, side)
        side = max(measured.tile_input_side + 1, math.ceil(math.sqrt(seconds / per_mpx * 1e6)))
    return min(4096, side)


def wait_for(check: Any, timeout: float, what: str, stack: Stack) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s\n{stack.logs()}")


def status_of(stack: Stack, job_id: str) -> str | None:
    raw = stack.redis().get(stack.keys.status(job_id))
    return None if raw is None else JobStatus.decode(raw).state


def stopped_lines(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in stack.worker_records()
        if r.get("job_id") == job_id and "while running: stopped after" in r.get("message", "")
    ]


class published_cost:
    """Make the API believe ``model`` costs what ``fake`` says (the API caches costs for 2 s);
    the worker's own figure is put back after."""

    def __init__(self, stack: Stack, model: str, fake: ModelCost) -> None:
        self.stack, self.model, self.fake = stack, model, fake

    def __enter__(self) -> None:
        self.saved = cost(self.stack, self.model)
        self.stack.redis().hset(self.stack.keys.costs, self.model, self.fake.encode())
        time.sleep(2.2)

    def __exit__(self, *exc: object) -> None:
        self.stack.redis().hset(self.stack.keys.costs, self.model, self.saved.encode())
        time.sleep(2.2)


def cheap_costs(stack: Stack, model: str) -> published_cost:
    """``model`` costs almost nothing, so the API admits a synchronous job that will outlive
    its caller's timeout."""
    return published_cost(stack, model, ModelCost(model, 1e-4, worker="test"))


def start_big_async_job(stack: Stack, http: httpx.Client, seed: int) -> httpx.Response:
    """An async job estimated at 8 s, once the worker is running it (its 202 answer)."""
    side = side_for(stack, "tiny_style", 8.0)
    big = http.post("/stylize?style=tiny_style&mode=async", content=png(side, side, seed),
                    headers={"content-type": "image/png"})  # fmt: skip
    assert big.status_code == 202, big.text
    job_id = big.json()["job_id"]
    wait_for(lambda: status_of(stack, job_id) == "running", 30, "big job running", stack)
    return big


def test_the_worker_measures_and_publishes_its_cost(stack: Stack) -> None:
    for model, factor in (("tiny_style", 1), ("mosaic", 1), ("x4", 4), ("x8", 8)):
        measured = cost(stack, model)
        assert measured.seconds_per_megapixel > 0 and measured.worker == "limits-worker"
        # Tiled images (input above TILE_SIZE / factor) are measured apart at start-up.
        assert measured.tile_input_side >= 128 // factor  # raised where the overlap needs it
        assert measured.tiled_samples >= 1 and measured.tiled_seconds_per_megapixel > 0
    text = httpx.get(stack.worker_metrics).text
    published = cost(stack, "tiny_style").seconds_per_megapixel
    exported = metric(text, "imgsvc_worker_seconds_per_megapixel", model="tiny_style")
    assert exported == pytest.approx(published)


def test_a_sync_job_that_cannot_finish_in_time_is_refused_up_front(stack: Stack) -> None:
    side = side_for(stack, "tiny_style", 3.0)  # twice the 1.5 s sync budget
    data = png(side, side)
    with stack.client() as http:
        started = time.monotonic()
        resp = http.post("/stylize?style=tiny_style", content=data,
                         headers={"content-type": "image/png"})  # fmt: skip
        elapsed = time.monotonic() - started
        assert resp.status_code == 413, resp.text
        body = resp.json()
        assert body["error"] == "job_too_expensive"
        assert body["limit_s"] == 1.5 and body["estimated_s"] > 1.5
        assert "REQUEST_TIMEOUT_S" in body["detail"] and "mode=async" in body["detail"]
        assert elapsed < 2.5  # refused before decoding, not after computing
        queued = [stack.redis().xlen(stream) for stream in stack.keys.streams]
        assert queued == [0, 0]
        # the same image as an async job is admitted, into the bulk lane
        accepted = http.post("/stylize?style=tiny_style&mode=async", content=data,
                             headers={"content-type": "image/png"})  # fmt: skip
        assert accepted.status_code == 202, accepted.text
        (entry,) = stack.redis().xrange(stack.keys.bulk_stream) or [None]
        if entry is not None:  # the worker may already have taken it
            job = Job.from_fields(entry[1])
            assert job.lane == "bulk" and job.cost_s > 1.5
        http.delete(accepted.json()["status_url"])


def test_admission_prices_a_tiled_image_at_the_tiled_cost(stack: Stack) -> None:
    """Whole images nearly free, tiled ones dear: an image one pixel under the tiling
    threshold is admitted synchronously, one a few pixels over is refused at the tiled
    figure (before, both were priced at the whole-image cost and the big one admitted)."""
    fake = ModelCost("tiny_style", 1e-4, worker="test", tile_input_side=128)
    fake.tiled_seconds_per_megapixel, fake.tiled_samples = 300.0, 1
    with published_cost(stack, "tiny_style", fake), stack.client() as http:
        small = http.post("/stylize?style=tiny_style", content=png(128, 96, 4),
                          headers={"content-type": "image/png"})  # fmt: skip
        assert small.status_code == 200, small.text
        big = http.post("/stylize?style=tiny_style", content=png(136, 96, 4),
                        headers={"content-type": "image/png"})  # fmt: skip
        assert big.status_code == 413, big.text
        body = big.json()
        assert body["error"] == "job_too_expensive"
        assert body["estimated_s"] == pytest.approx(300.0 * 136 * 96 / 1e6, rel=0.01)


def test_a_big_job_pauses_for_small_ones_and_delete_stops_it(stack: Stack) -> None:
    """The defect-1 scenario on a tiny model: one big async job holds the only worker; small
    synchronous requests sent meanwhile are answered between its forward passes, and
    ``DELETE /jobs/{id}`` stops it at the next pass."""
    before = httpx.get(stack.worker_metrics).text
    with stack.client() as http:
        big = start_big_async_job(stack, http, seed=1)
        job_id = big.json()["job_id"]
        latencies = []
        for seed in range(3):
            started = time.monotonic()
            small = http.post(
                "/stylize?style=tiny_style", files={"image": ("s.png", png(48, 32, seed))}
            )
            latencies.append(time.monotonic() - started)
            assert small.status_code == 200, small.text
        assert status_of(stack, job_id) == "running", "the big job ended before the small ones"
        assert max(latencies) < REQUEST_TIMEOUT_S, latencies
        cancelled = http.delete(big.json()["status_url"])
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        wait_for(lambda: stopped_lines(stack, job_id), 10, "the big job stopped", stack)
        assert http.get(big.json()["status_url"]).status_code == 410
    assert stack.redis().exists(stack.keys.result(job_id)) == 0
    after = httpx.get(stack.worker_metrics).text
    assert metric(after, "imgsvc_worker_preemptions_total") > metric(
        before, "imgsvc_worker_preemptions_total"
    )
    assert metric(after, "imgsvc_worker_stopped_jobs_total", reason="cancelled") > metric(
        before, "imgsvc_worker_stopped_jobs_total", reason="cancelled"
    )


def test_a_504_stops_the_running_job(stack: Stack) -> None:
    side = side_for(stack, "tiny_style", 8.0)
    with cheap_costs(stack, "tiny_style"), stack.client() as http:
        started = time.monotonic()
        resp = http.post("/stylize?style=tiny_style", content=png(side, side, 2),
                         headers={"content-type": "image/png"})  # fmt: skip
        assert resp.status_code == 504, resp.text
        assert REQUEST_TIMEOUT_S <= time.monotonic() - started < REQUEST_TIMEOUT_S + 2
        job_id = resp.json()["job_id"]
        wait_for(lambda: stopped_lines(stack, job_id), 10, "the job stopped", stack)
    # Stopped for its cancel marker (no result) or, if the worker looked at the deadline just
    # before the marker landed, with a 504 result nobody reads: never the computed image.
    blob = stack.redis().get(stack.keys.result(job_id))
    if blob is not None:
        stored = JobResult.decode(blob)
        assert (stored.ok, stored.status_code, stored.image) == (False, 504, b"")


def test_a_client_that_goes_away_has_its_running_job_stopped(stack: Stack) -> None:
    side = side_for(stack, "tiny_style", 8.0)
    before = httpx.get(stack.url + "/metrics").text

    def stopped_by_caller() -> set[str]:
        return {
            r["job_id"]
            for r in stack.worker_records()
            if "cancelled by its caller while running" in r.get("message", "")
        }

    earlier = stopped_by_caller()
    with cheap_costs(stack, "tiny_style"):
        with stack.client(timeout=1.0) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/stylize?style=tiny_style", content=png(side, side, 3),
                           headers={"content-type": "image/png"})  # fmt: skip
        # stopped because its caller left (not at its deadline, 3 s after submission)
        wait_for(lambda: stopped_by_caller() - earlier, 10, "the abandoned job stopped", stack)
    after = httpx.get(stack.url + "/metrics").text
    rise = metric(after, "imgsvc_jobs_total", outcome="client_gone") - metric(
        before, "imgsvc_jobs_total", outcome="client_gone"
    )
    assert rise == 1
    assert metric(after, "imgsvc_http_requests_total", route="/stylize", status="499") >= 1


def test_worker_logs_and_metrics_follow_the_request(stack: Stack) -> None:
    with stack.client() as http:
        resp = http.post("/upscale?factor=8", files={"image": ("s.png", png(20, 12))},
                         headers={"X-Request-ID": "limits-req-1"})  # fmt: skip
        assert resp.status_code == 200, resp.text
    job_id = resp.headers["x-job-id"]
    lines = wait_for(
        lambda: [r for r in stack.worker_records() if r.get("request_id") == "limits-req-1"],
        10, "worker lines of the request", stack,
    )  # fmt: skip
    computed = next(r for r in lines if r["message"].startswith("computed"))
    assert computed["job_id"] == job_id and computed["model"] == "x8"
    assert computed["worker_id"] == "limits-worker" and computed["compute"] > 0
    text = httpx.get(stack.worker_metrics).text
    assert metric(text, "imgsvc_worker_jobs_total", model="x8", outcome="ok") >= 1
    assert metric(text, "imgsvc_worker_batch_size_count") >= 1
    assert metric(text, "imgsvc_worker_forward_pass_seconds_count", model="x8") >= 1
    assert metric(text, "imgsvc_worker_queue_wait_seconds_count", model="x8") >= 1
    assert metric(text, "process_resident_memory_bytes") > 50e6


def test_async_jobs_are_counted_once_with_their_latency(stack: Stack) -> None:
    with stack.client() as http:
        accepted = http.post(
            "/upscale?factor=4&mode=async", files={"image": ("a.png", png(16, 12))}
        )
        url = accepted.json()["status_url"]
        done = wait_for(lambda: http.get(url).status_code == 200, 30, "async job done", stack)
        assert done
        assert http.get(url).status_code == 200  # polled again: counted once
        text = http.get("/metrics").text
    labels = {"op": "upscale", "model": "x4", "mode": "async"}
    assert metric(text, "imgsvc_jobs_total", outcome="accepted", **labels) == 1
    assert metric(text, "imgsvc_jobs_total", outcome="ok", **labels) == 1
    assert metric(text, "imgsvc_image_latency_seconds_count", **labels) == 1
    assert metric(text, "imgsvc_compute_seconds_count", op="upscale", model="x4") == 1


def test_a_job_that_would_wait_past_its_timeout_is_refused_at_once(stack: Stack) -> None:
    """A synchronous job queued behind more work than its timeout leaves (here a medium job
    in the bulk lane behind an 8 s async job) is answered 503 ``queue_busy`` at once, not 504
    after ``REQUEST_TIMEOUT_S``; a small job, whose lane is empty, is still served; and once
    the big job is gone (DELETE: its worker takes it off the backlog) the medium job is too."""
    medium_side = side_for(stack, "tiny_style", 1.0)
    medium = png(medium_side, medium_side, 6)
    with stack.client() as http:
        big = start_big_async_job(stack, http, seed=5)
        job_id = big.json()["job_id"]
        started = time.monotonic()
        busy = http.post("/stylize?style=tiny_style", content=medium,
                         headers={"content-type": "image/png"})  # fmt: skip
        assert time.monotonic() - started < 1.5  # refused, not waited out (3 s timeout)
        assert busy.status_code == 503, busy.text
        body = busy.json()
        assert body["error"] == "queue_busy" and body["workers"] == 1
        assert body["wait_s"] > REQUEST_TIMEOUT_S and body["limit_s"] == REQUEST_TIMEOUT_S
        assert "bulk lane" in body["detail"]
        assert int(busy.headers["Retry-After"]) >= body["wait_s"] - REQUEST_TIMEOUT_S
        assert stack.redis().xlen(stack.keys.bulk_stream) == 1  # only the big job
        # The Python client reads it as backpressure, like a full queue.
        policy = RetryPolicy(max_retries=0)
        with Client(stack.url, retry=policy) as client, pytest.raises(QueueFull) as caught:
            client.stylize(medium, "tiny_style")
        assert caught.value.code == "queue_busy" and caught.value.retry_after
        small = http.post("/stylize?style=tiny_style", files={"image": ("s.png", png(48, 32))})
        assert small.status_code == 200, small.text

        assert http.delete(big.json()["status_url"]).status_code == 200
        wait_for(lambda: stopped_lines(stack, job_id), 10, "the big job stopped", stack)
        wait_for(lambda: stack.redis().zcard(stack.keys.backlog) == 0, 5, "backlog empty", stack)
        served = http.post("/stylize?style=tiny_style", content=medium,
                           headers={"content-type": "image/png"})  # fmt: skip
        assert served.status_code == 200, served.text
    text = httpx.get(stack.url + "/metrics").text
    assert metric(text, "imgsvc_jobs_total", op="stylize", model="tiny_style", mode="sync",
                  outcome="busy") >= 1  # fmt: skip

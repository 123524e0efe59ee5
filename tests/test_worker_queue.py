"""``python -m worker`` as a real process against a real redis-server, speaking
``jobqueue.protocol`` exactly as the API does: results, errors, reclaiming, dead-lettering,
cancellation and shutdown."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from jobqueue.consumer import Consumer, Entry
from jobqueue.protocol import (
    CONSUMER_GROUP,
    Job,
    JobResult,
    JobStatus,
    Keys,
    ModelCost,
    decode_costs,
)
from model_zoo.reference import apply_to_image
from model_zoo.registry import load_model
from worker.costs import fingerprint
from worker.engine import Engine
from worker.main import Worker, build_engine
from worker.settings import WorkerSettings

from .conftest import NO_TILED_COST_PROBE

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90  # importing torch on a busy 2-core machine can take a while


def image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def make_job(pixels: np.ndarray, model: str = "tiny_style", **fields: object) -> Job:
    fields.setdefault("op", "upscale" if model.startswith("x") else "stylize")
    height, width, channels = pixels.shape
    return Job(
        model=model,
        width=width,
        height=height,
        channels=channels,
        pixels=pixels.tobytes(),
        **fields,  # type: ignore[arg-type]
    )


def reference(zoo: Path, name: str, pixels: np.ndarray) -> np.ndarray:
    net, _ = load_model(name, root=zoo)
    return np.asarray(apply_to_image(net, Image.fromarray(pixels[..., :3])))


class Queue:
    """The API's side of the protocol, as a test client."""

    def __init__(self, url: str, prefix: str) -> None:
        self.redis = redis.Redis.from_url(url)
        self.keys = Keys(prefix)

    def submit(self, job: Job) -> str:
        self.redis.xadd(self.keys.stream, job.to_fields())  # type: ignore[arg-type]
        return job.job_id

    def result(self, job_id: str, timeout: float = 60) -> JobResult:
        popped = self.redis.blpop([self.keys.done(job_id)], timeout=timeout)
        assert popped is not None, f"no result for job {job_id} within {timeout}s"
        blob = self.redis.get(self.keys.result(job_id))
        assert blob is not None
        return JobResult.decode(blob)

    def pending(self) -> list[dict]:
        try:
            return self.redis.xpending_range(self.keys.stream, CONSUMER_GROUP, "-", "+", 100)
        except redis.ResponseError:
            return []

    def heartbeat(self, worker_id: str) -> dict | None:
        raw = self.redis.get(self.keys.heartbeat(worker_id))
        return json.loads(raw) if raw else None

    def wait_pending_on(self, worker_id: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(p["consumer"].decode() == worker_id for p in self.pending()) >= count:
                return
            time.sleep(0.02)
        raise AssertionError(f"{worker_id} never picked up {count} job(s)")


class WorkerProcess:
    def __init__(self, process: subprocess.Popen[bytes], worker_id: str, log: Path) -> None:
        self.process, self.worker_id, self.log = process, worker_id, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def run_worker(
    url: str, zoo: Path, prefix: str, tmp_path: Path, wait_ready: bool = True, **env: object
) -> Iterator[WorkerProcess]:
    worker_id = f"w-{uuid.uuid4().hex[:8]}"
    settings = {
        "REDIS_URL": url,
        "MODEL_ZOO_DIR": str(zoo),
        "QUEUE_PREFIX": prefix,
        "WORKER_ID": worker_id,
        "TORCH_THREADS": "1",
        "HEARTBEAT_INTERVAL_S": "0.2",
        "CLAIM_IDLE_MS": "30000",
        "MAX_WAIT_MS": "20",
        "PRECISION": "fp32",
        "LOG_LEVEL": "INFO",
        **NO_TILED_COST_PROBE,
        **{k: str(v) for k, v in env.items()},
    }
    log = tmp_path / f"{worker_id}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker"],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **settings},
        )
    worker = WorkerProcess(process, worker_id, log)
    try:
        if wait_ready:
            queue = Queue(url, prefix)
            deadline = time.monotonic() + START_TIMEOUT_S
            # Its costs measured, too: a worker serves while it measures them, but these
            # tests count passes and time jobs, which a probe between them would disturb.
            while (beat := queue.heartbeat(worker_id)) is None or beat.get("measuring"):
                assert process.poll() is None, f"worker exited early:\n{worker.output()}"
                assert time.monotonic() < deadline, f"worker not ready:\n{worker.output()}"
                time.sleep(0.05)
        yield worker
    except BaseException:
        print(worker.output())
        raise
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def assert_drained(queue: Queue) -> None:
    assert queue.redis.xlen(queue.keys.stream) == 0
    assert queue.pending() == []


def test_job_on_the_stream_gets_the_models_pixels(
    redis_server: str, tiny_zoo: Path, tmp_path: Path
) -> None:
    queue = Queue(redis_server, "t1")
    rgb, rgba = image(40, 52, seed=1), image(23, 31, channels=4, seed=2)
    jobs = {
        "style": make_job(rgb),
        "sr_rgba": make_job(rgba, "x4", output_format="webp"),
        "jpeg": make_job(rgb, "x8", output_format="jpeg"),
    }
    # Queued before any worker exists: the group is created from the stream's start.
    for job in jobs.values():
        queue.submit(job)
    with run_worker(redis_server, tiny_zoo, "t1", tmp_path):
        results = {name: queue.result(job.job_id) for name, job in jobs.items()}
        assert all(r.ok and r.status_code == 200 for r in results.values())

        style = results["style"]
        assert style.content_type == "image/png"
        decoded = np.asarray(Image.open(io.BytesIO(style.image)))
        assert np.abs(decoded.astype(int) - reference(tiny_zoo, "tiny_style", rgb)).max() <= 1
        assert set(style.timings) == {"queue", "compute", "encode", "batch_size"}
        assert style.timings["compute"] > 0 and style.timings["batch_size"] >= 1

        sr = Image.open(io.BytesIO(results["sr_rgba"].image))
        assert results["sr_rgba"].content_type == "image/webp"
        assert sr.size == (124, 92) and sr.mode == "RGBA"
        jpeg = Image.open(io.BytesIO(results["jpeg"].image))
        assert jpeg.format == "JPEG" and jpeg.size == (416, 320)

        for job in jobs.values():
            status = JobStatus.decode(queue.redis.get(queue.keys.status(job.job_id)))
            assert (status.state, status.job_id, status.model) == ("done", job.job_id, job.model)
            assert 0 < queue.redis.ttl(queue.keys.result(job.job_id)) <= 600
        assert_drained(queue)


def test_bad_jobs_get_error_results_and_the_worker_survives(
    redis_server: str, tiny_zoo: Path, tmp_path: Path
) -> None:
    queue = Queue(redis_server, "t2")
    with run_worker(redis_server, tiny_zoo, "t2", tmp_path) as worker:
        unknown = queue.submit(make_job(image(16, 16), model="no_such_style"))
        wrong_op = queue.submit(make_job(image(16, 16), model="x4", op="stylize"))
        malformed_id = uuid.uuid4().hex
        good = make_job(image(24, 24))
        malformed = good.to_fields() | {"job_id": malformed_id, "width": "25"}
        queue.redis.xadd(queue.keys.stream, malformed)  # type: ignore[arg-type]
        no_id = queue.redis.xadd(queue.keys.stream, {"model": "x4"})
        queue.submit(good)

        result = queue.result(unknown)
        assert (result.ok, result.status_code) == (False, 404)
        assert "no_such_style" in result.error and "tiny_style" in result.error
        result = queue.result(wrong_op)
        assert (result.status_code, result.ok) == (422, False) and "upscale" in result.error
        result = queue.result(malformed_id)
        assert result.status_code == 422 and "pixel buffer" in result.error
        assert queue.result(good.job_id).ok

        dead = queue.redis.xrange(queue.keys.dead_letter)
        assert [(f[b"job_id"].decode(), f[b"dead_status"]) for _, f in dead[:1]] == [
            (malformed_id, b"422")
        ]
        assert dead[1][1][b"dead_source_id"] == no_id
        assert JobStatus.decode(queue.redis.get(queue.keys.status(malformed_id))).state == "failed"
        assert_drained(queue)
        assert worker.process.poll() is None


def test_two_workers_share_one_stream(redis_server: str, tiny_zoo: Path, tmp_path: Path) -> None:
    queue = Queue(redis_server, "t3")
    options = {"MAX_BATCH": 2, "MAX_WAIT_MS": 50}
    with (
        run_worker(redis_server, tiny_zoo, "t3", tmp_path, **options) as first,
        run_worker(redis_server, tiny_zoo, "t3", tmp_path, **options) as second,
    ):
        jobs = [make_job(image(48, 48, seed=i)) for i in range(16)]
        for job in jobs:
            queue.submit(job)
        for job in jobs:
            assert queue.result(job.job_id).ok
        counts = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # heartbeats publish the counts periodically
            beats = {w.worker_id: queue.heartbeat(w.worker_id) for w in (first, second)}
            counts = {k: beat["jobs_done"] for k, beat in beats.items() if beat}
            if sum(counts.values()) == len(jobs):
                break
            time.sleep(0.1)
        assert sum(counts.values()) == len(jobs)
        assert min(counts.values()) > 0, counts
        assert_drained(queue)


def test_job_of_a_killed_worker_is_completed_by_another(
    redis_server: str, tiny_zoo: Path, tmp_path: Path
) -> None:
    queue = Queue(redis_server, "t4")
    pixels = image(36, 44, seed=7)
    job = make_job(pixels)
    # The victim waits 60 s for batch-mates after its first job: killed inside that window, it
    # holds the job delivered but neither computed nor acknowledged.
    with run_worker(redis_server, tiny_zoo, "t4", tmp_path, MAX_WAIT_MS=60_000) as victim:
        queue.submit(job)
        queue.wait_pending_on(victim.worker_id)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=10)
    assert queue.redis.exists(queue.keys.result(job.job_id)) == 0
    with run_worker(redis_server, tiny_zoo, "t4", tmp_path, CLAIM_IDLE_MS=1000) as rescuer:
        result = queue.result(job.job_id)
        assert result.ok
        decoded = np.asarray(Image.open(io.BytesIO(result.image)))
        assert np.abs(decoded.astype(int) - reference(tiny_zoo, "tiny_style", pixels)).max() <= 1
        assert "reclaimed 1 job" in rescuer.output() and "(delivery 2)" in rescuer.output()
        assert_drained(queue)


def test_job_that_keeps_killing_workers_is_dead_lettered_with_503(
    redis_server: str, tiny_zoo: Path, tmp_path: Path
) -> None:
    queue = Queue(redis_server, "t5")
    queue.redis.xgroup_create(queue.keys.stream, CONSUMER_GROUP, id="0", mkstream=True)
    job = make_job(image(16, 16))
    entry = queue.redis.xadd(queue.keys.stream, job.to_fields())  # type: ignore[arg-type]
    # Three workers took it and died: one read plus two takeovers, each a delivery.
    queue.redis.xreadgroup(CONSUMER_GROUP, "ghost-1", {queue.keys.stream: ">"}, count=1)
    for ghost in ("ghost-2", "ghost-3"):
        queue.redis.xclaim(queue.keys.stream, CONSUMER_GROUP, ghost, 0, [entry])
    assert queue.pending()[0]["times_delivered"] == 3
    with run_worker(redis_server, tiny_zoo, "t5", tmp_path, CLAIM_IDLE_MS=400, MAX_DELIVERIES=3):
        result = queue.result(job.job_id)
        assert (result.ok, result.status_code) == (False, 503)
        assert "died 3 times" in result.error
        dead = queue.redis.xrange(queue.keys.dead_letter)
        assert len(dead) == 1 and dead[0][1][b"job_id"].decode() == job.job_id
        assert dead[0][1][b"dead_deliveries"] == b"4"
        assert_drained(queue)


def test_expired_and_cancelled_jobs_are_not_computed(
    redis_server: str, tiny_zoo: Path, tmp_path: Path
) -> None:
    queue = Queue(redis_server, "t6")
    expired = make_job(image(32, 32), deadline=time.time() - 1)
    cancelled = make_job(image(32, 32))
    queue.redis.set(queue.keys.cancel(cancelled.job_id), 1)
    live = make_job(image(32, 32), deadline=time.time() + 600)
    for job in (expired, cancelled, live):
        queue.submit(job)
    with run_worker(redis_server, tiny_zoo, "t6", tmp_path) as worker:
        result = queue.result(expired.job_id)
        assert (result.ok, result.status_code, result.image) == (False, 504, b"")
        assert "compute" not in result.timings
        assert queue.result(live.job_id).ok
        assert queue.redis.exists(queue.keys.result(cancelled.job_id)) == 0
        assert_drained(queue)
        time.sleep(0.5)  # one more heartbeat
        beat = queue.heartbeat(worker.worker_id)
        assert beat is not None and beat["jobs_done"] == 1
        # What each loaded net runs in (calibration and the CPU speed probe decide per model).
        assert set(beat["model_precision"]) == set(beat["models"])
        assert set(beat["model_precision"].values()) <= {"fp32", "bf16", "fp16"}
        heads = beat["model_full_precision_head"]
        assert set(heads) == set(beat["models"]) and all(h >= 0 for h in heads.values())
        assert "cancelled by its caller" in worker.output()


def test_sigterm_finishes_the_batch_in_flight_then_exits_zero(
    redis_server: str, tiny_zoo: Path, tmp_path: Path
) -> None:
    queue = Queue(redis_server, "t7")
    with run_worker(redis_server, tiny_zoo, "t7", tmp_path, MAX_WAIT_MS=60_000) as worker:
        first = make_job(image(40, 40, seed=1))
        queue.submit(first)
        queue.wait_pending_on(worker.worker_id)  # read, still collecting its batch
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=30) == 0
        result = queue.result(first.job_id, timeout=1)
        assert result.ok
        assert queue.heartbeat(worker.worker_id) is None
        later = make_job(image(40, 40, seed=2))
        queue.submit(later)
        time.sleep(0.3)
        assert queue.redis.xlen(queue.keys.stream) == 1  # nobody took it: the worker is gone
        assert queue.pending() == []


def test_a_live_workers_jobs_are_not_taken_over(
    redis_server: str, tiny_zoo: Path, tmp_path: Path
) -> None:
    """A job in flight longer than CLAIM_IDLE_MS stays with its (alive) worker: the heartbeat
    refreshes it, so a second worker does not compute it again."""
    queue = Queue(redis_server, "t8")
    job = make_job(image(24, 24))
    options = {"CLAIM_IDLE_MS": 500, "HEARTBEAT_INTERVAL_S": 0.1}
    with run_worker(redis_server, tiny_zoo, "t8", tmp_path, MAX_WAIT_MS=60_000, **options) as busy:
        queue.submit(job)
        queue.wait_pending_on(busy.worker_id)
        with run_worker(redis_server, tiny_zoo, "t8", tmp_path, **options) as other:
            time.sleep(1.5)  # three claim timeouts
            (pending,) = queue.pending()
            assert pending["consumer"].decode() == busy.worker_id
            assert pending["times_delivered"] == 1
            busy.process.send_signal(signal.SIGTERM)  # ends the batch window: compute, store
            assert busy.process.wait(timeout=30) == 0
            assert queue.result(job.job_id, timeout=1).ok
            assert "reclaimed" not in other.output()
            assert queue.heartbeat(other.worker_id)["jobs_done"] == 0  # type: ignore[index]


def in_process_worker(redis_server: str, zoo: Path, prefix: str, **settings: object) -> Worker:
    """A worker driven by the test itself (``next_batch`` / ``process``), for fresh jobs only:
    its reclaim pass is put off by an hour."""
    worker_settings = WorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=redis_server,
        queue_prefix=prefix,
        model_zoo_dir=zoo,
        max_batch=8,
        worker_id=f"w-{prefix}",
        **settings,  # type: ignore[arg-type]
    )
    worker = Worker(worker_settings, Engine(zoo_dir=zoo, device="cpu"))
    worker.ensure_group()
    worker.last_claim = time.monotonic() + 3600
    return worker


def assert_a_job_arriving_inside_the_window_joins_the_batch(
    queue: Queue, worker: Worker
) -> list[Entry]:
    """Submit one job, a second 50 ms later, and read one batch: both must be in it."""
    first, second = make_job(image(8, 8)), make_job(image(8, 8))
    queue.submit(first)
    late = threading.Timer(0.05, queue.submit, args=(second,))
    late.start()
    entries, _ = worker.next_batch()
    late.join()
    assert [Job.from_fields(e.fields).job_id for e in entries if e.fields] == [
        first.job_id,
        second.job_id,
    ]
    return entries


def test_batch_window_is_max_wait_ms_not_the_redis_timer_tick(
    redis_server: str, tiny_zoo: Path
) -> None:
    """Redis ends a blocking read's timeout only on its timer tick (100 ms at the default hz 10),
    so waiting MAX_WAIT_MS=10 for batch-mates with ``XREADGROUP BLOCK 10`` held every lone job
    ~100 ms. The worker must poll the window instead: it returns well under one tick, and a
    job that arrives inside the window still joins the batch."""
    queue = Queue(redis_server, "t9")
    hz = queue.redis.config_get("hz")["hz"]
    queue.redis.config_set("hz", 10)
    try:
        # every lone job waits its window (the adaptive one is below)
        worker = in_process_worker(
            redis_server, tiny_zoo, "t9", max_wait_ms=10, batch_window="fixed"
        )
        settings = worker.settings
        windows = []
        for _ in range(5):
            queue.submit(make_job(image(8, 8)))
            started = time.perf_counter()
            entries, isolated = worker.next_batch()
            windows.append(time.perf_counter() - started)
            assert len(entries) == 1 and not isolated
        # A behaviour check, not a benchmark: a tick-bound window takes >= 100 ms every time.
        assert sorted(windows)[len(windows) // 2] < 0.060, windows

        worker.settings = settings.model_copy(update={"max_wait_ms": 5000, "max_batch": 2})
        assert_a_job_arriving_inside_the_window_joins_the_batch(queue, worker)
    finally:
        queue.redis.config_set("hz", hz)


def test_the_adaptive_window_stops_holding_a_lone_caller_and_reopens_for_concurrent_ones(
    redis_server: str, tiny_zoo: Path
) -> None:
    """With real Redis: a lone caller's first two jobs wait out MAX_WAIT_MS for batch-mates who
    never come; after that its jobs are taken without the wait (bar a probe every 8th), and a
    backlog opens the window again so that a job arriving inside it joins the batch."""
    queue = Queue(redis_server, "t9a")
    worker = in_process_worker(redis_server, tiny_zoo, "t9a", max_wait_ms=400)
    assert worker.settings.batch_window == "adaptive"  # the default

    def lone() -> float:
        queue.submit(make_job(image(8, 8)))
        started = time.perf_counter()
        entries, _ = worker.next_batch()
        assert len(entries) == 1
        worker.process(entries)
        return time.perf_counter() - started

    held = [lone() for _ in range(10)]
    # Behaviour, not speed: a job taken with the window open is held >= 400 ms by construction.
    assert [t >= 0.4 for t in held] == [True, True] + [False] * 7 + [True], held

    def window_count(outcome: str) -> float | None:
        return worker.metrics.registry.get_sample_value(
            "imgsvc_worker_batch_windows_total", {"outcome": outcome}
        )

    assert (window_count("fruitless"), window_count("skipped")) == (3, 7)

    backlog = [make_job(image(8, 8, seed=i)) for i in range(3)]
    for job in backlog:
        queue.submit(job)
    entries, _ = worker.next_batch()
    assert len(entries) == 3
    worker.process(entries)
    assert window_count("backlog") == 1
    batch = assert_a_job_arriving_inside_the_window_joins_the_batch(queue, worker)
    worker.process(batch)
    assert window_count("caught") == 1
    for job in backlog + [Job.from_fields(e.fields) for e in batch if e.fields]:
        assert queue.result(job.job_id, timeout=5).ok


def test_an_operator_sets_when_the_window_closes_and_how_often_it_probes(
    redis_server: str, tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BATCH_WINDOW_CLOSE_AFTER=1, BATCH_WINDOW_PROBE_EVERY=3 from the environment: one
    fruitless wait closes the window, then every third lone job waits again."""
    monkeypatch.setenv("BATCH_WINDOW_CLOSE_AFTER", "1")
    monkeypatch.setenv("BATCH_WINDOW_PROBE_EVERY", "3")
    queue = Queue(redis_server, "t9c")
    worker = in_process_worker(redis_server, tiny_zoo, "t9c", max_wait_ms=300)
    held = []
    for seed in range(7):
        queue.submit(make_job(image(8, 8, seed=seed)))
        started = time.perf_counter()
        entries, _ = worker.next_batch()
        worker.process(entries)
        held.append(time.perf_counter() - started >= 0.3)
    assert held == [True, False, False, True, False, False, True]
    for bad in ("0", "x"):
        monkeypatch.setenv("BATCH_WINDOW_PROBE_EVERY", bad)
        with pytest.raises(ValueError, match="batch_window_probe_every"):
            WorkerSettings(_env_file=None)  # type: ignore[call-arg]


def test_a_batch_is_encoded_at_once_and_a_result_that_cannot_be_encoded_fails_alone(
    redis_server: str, tiny_zoo: Path
) -> None:
    """The encode pool (ENCODE_THREADS) answers every job of a batch in its own format; a
    result the format cannot hold (WebP stops at 16,383 px a side) gets a 422 naming the
    format, and its batch-mates their images."""
    queue = Queue(redis_server, "t9b")
    worker = in_process_worker(redis_server, tiny_zoo, "t9b", encode_threads=3)
    assert worker.encoder._max_workers == 3
    jobs = [
        make_job(image(24, 24, seed=1), output_format="png"),
        make_job(image(24, 24, seed=2), output_format="jpeg"),
        make_job(image(16_400, 8, seed=3), output_format="webp"),
        make_job(image(24, 24, seed=4), output_format="webp"),
    ]
    for job in jobs:
        queue.submit(job)
    entries, _ = worker.next_batch()
    assert len(entries) == 4
    worker.process(entries)
    results = [queue.result(job.job_id, timeout=5) for job in jobs]
    assert [r.ok for r in results] == [True, True, False, True]
    assert [r.content_type for r in results if r.ok] == ["image/png", "image/jpeg", "image/webp"]
    for job, result in zip(jobs, results, strict=True):
        if result.ok:
            assert Image.open(io.BytesIO(result.image)).size == (job.width, job.height)
            assert result.timings["encode"] > 0
    assert results[2].status_code == 422 and "could not encode the result as webp" in (
        results[2].error
    )
    assert_drained(queue)


def test_a_starting_worker_adopts_the_cost_its_twin_published_and_probes_otherwise(
    redis_server: str, tiny_zoo: Path
) -> None:
    """The cost probes are most of a CPU worker's start-up; a worker joining a deployment
    takes the figure a worker with the same weights, runtime and hardware published (a probe
    never times the same float twice), and probes whatever differs."""
    queue = Queue(redis_server, "t-cost")

    def worker(worker_id: str, **update: object) -> Worker:
        settings = WorkerSettings(
            _env_file=None,  # type: ignore[call-arg]
            redis_url=redis_server, queue_prefix="t-cost", model_zoo_dir=tiny_zoo,
            worker_id=worker_id, precision="fp32", tile_size=96, **update,
        )  # fmt: skip
        return Worker(settings, build_engine(settings))

    def published() -> dict[str, ModelCost]:
        return decode_costs(queue.redis.hgetall(queue.keys.costs))

    first = worker("w-first")
    names = first.engine.load(None)
    first.measure_costs(names)
    measured = published()
    assert set(measured) == set(names)
    for name in names:
        assert measured[name].worker == "w-first" and measured[name].samples == 1
        assert measured[name].fingerprint == fingerprint(first.engine, name)
    assert any(cost.tiled_samples for cost in measured.values())  # the tiled probe ran

    # A twin adopts every figure (and republishes it as its own, to be refined by its jobs).
    twin = worker("w-twin")
    twin.engine.load(None)
    twin.measure_costs(names)
    for name in names:
        cost = twin.costs.get(name)
        assert cost is not None and cost.worker == "w-twin"
        assert cost.seconds_per_megapixel == measured[name].seconds_per_megapixel
        assert cost.tiled_seconds_per_megapixel == measured[name].tiled_seconds_per_megapixel
        assert published()[name].worker == "w-twin"

    # A figure measured on other hardware (another fingerprint) is not adopted: probed again.
    other = "tiny_style"
    foreign = ModelCost(**vars(measured[other]) | {"fingerprint": "elsewhere", "worker": "w-x"})
    queue.redis.hset(queue.keys.costs, other, foreign.encode())
    third = worker("w-third")
    third.engine.load(None)
    third.measure_costs(names)
    probed = third.costs.get(other)
    assert probed is not None and probed.fingerprint == fingerprint(third.engine, other)
    assert probed.seconds_per_megapixel != foreign.seconds_per_megapixel
    adopted = [n for n in names if n != other]
    for name in adopted:
        assert third.costs.get(name).seconds_per_megapixel == measured[name].seconds_per_megapixel  # type: ignore[union-attr]

    # And an operator may insist on probing.
    stubborn = worker("w-stubborn", cost_probe_reuse=False)
    stubborn.engine.load(None)
    stubborn.measure_costs(names)
    assert all(
        stubborn.costs.get(n).seconds_per_megapixel != measured[n].seconds_per_megapixel  # type: ignore[union-attr]
        for n in adopted
    )


def test_workers_starting_together_probe_each_model_once(redis_server: str, tiny_zoo: Path) -> None:
    """``docker compose up --scale worker=2``: one worker claims each model's probe and the
    other waits for its figure (probing at the same moment on shared cores would also inflate
    both figures); the claims are released."""
    queue = Queue(redis_server, "t-cost2")
    workers = []
    for worker_id in ("w-left", "w-right"):
        settings = WorkerSettings(
            _env_file=None,  # type: ignore[call-arg]
            redis_url=redis_server, queue_prefix="t-cost2", model_zoo_dir=tiny_zoo,
            worker_id=worker_id, precision="fp32", tile_size=96,
        )  # fmt: skip
        worker = Worker(settings, build_engine(settings))
        names = worker.engine.load(None)
        workers.append(worker)
    together = threading.Barrier(len(workers))

    def start(worker: Worker) -> None:
        together.wait()  # both look for a published figure at the same moment
        worker.measure_costs(names)

    threads = [threading.Thread(target=start, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    left, right = workers
    for name in names:
        a, b = left.costs.get(name), right.costs.get(name)
        assert a is not None and b is not None, name
        # Exactly one of them timed it: the other holds the very same floats.
        assert a.seconds_per_megapixel == b.seconds_per_megapixel, name
        assert a.tiled_seconds_per_megapixel == b.tiled_seconds_per_megapixel, name
        assert a.fingerprint == b.fingerprint == fingerprint(left.engine, name)
    assert list(queue.redis.scan_iter(match="t-cost2:costprobe:*")) == []


def test_a_starting_worker_serves_while_its_costs_are_still_being_measured(
    redis_server: str, tiny_zoo: Path
) -> None:
    """The probes were ~70 % of a CPU worker's start-up, and nothing was served until all
    had run. Now a job waits for at most one probe: here every probe is held by a twin (as
    when two workers start together), so this worker cannot measure anything yet, and must
    still answer the job queued before it started; it adopts the twin's figures when they
    come, and the heartbeat says which models it is still measuring meanwhile."""
    queue = Queue(redis_server, "t-cost3")
    settings = WorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=redis_server, queue_prefix="t-cost3", model_zoo_dir=tiny_zoo,
        worker_id="w-late", precision="fp32", cost_probe_tiled_scale=0,
        cost_probe_wait_s=120, heartbeat_interval_s=0.2,
    )  # fmt: skip
    worker = Worker(settings, build_engine(settings))
    names = worker.engine.load(None)
    twin = Consumer.from_settings(settings, "w-twin")
    marks = {name: fingerprint(worker.engine, name) for name in names}
    assert all(twin.claim_cost_probe(name, mark, 120_000) for name, mark in marks.items())
    pixels = image(24, 20, seed=5)
    job_id = queue.submit(make_job(pixels))
    worker.unmeasured = list(names)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        result = queue.result(job_id, timeout=60)
        assert result.ok, result.error
        decoded = np.asarray(Image.open(io.BytesIO(result.image)))
        assert np.abs(decoded.astype(int) - reference(tiny_zoo, "tiny_style", pixels)).max() <= 1
        assert decode_costs(queue.redis.hgetall(queue.keys.costs)) == {}  # nothing measured
        beat = queue.heartbeat("w-late")
        assert beat is not None and sorted(beat["measuring"]) == sorted(names)

        # The twin publishes its figures and lets the claims go: adopted, none probed.
        twin.publish_costs(
            ModelCost(name, 0.5 + i, worker="w-twin", fingerprint=mark)
            for i, (name, mark) in enumerate(marks.items())
        )
        for name, mark in marks.items():
            twin.release_cost_probe(name, mark)
        deadline = time.monotonic() + 30
        while (beat := queue.heartbeat("w-late")) is None or beat["measuring"]:
            assert time.monotonic() < deadline, beat
            time.sleep(0.05)
        for i, name in enumerate(marks):
            assert worker.costs.get(name).seconds_per_megapixel == 0.5 + i  # type: ignore[union-attr]
    finally:
        worker.stopping.set()
        thread.join(timeout=30)
    assert not thread.is_alive()

"""``python -m worker``: take jobs from the Redis stream, compute them in batches, store results.

One loop iteration (see ``jobqueue.protocol`` for the keys):

1. Every ``CLAIM_IDLE_MS / 2`` (at most 5 s), ``XAUTOCLAIM`` jobs that have been pending longer
   than ``CLAIM_IDLE_MS`` - their worker died. Reclaimed jobs run one at a time, so a job that
   kills its worker cannot take innocent batch-mates down with it again; ``XPENDING`` gives
   each one's delivery count and beyond ``MAX_DELIVERIES`` it is dead-lettered and its caller
   gets a 503 instead of a hang.
2. Otherwise ``XREADGROUP`` new jobs: up to ``MAX_BATCH``, waiting ``MAX_WAIT_MS`` after the
   first (``worker.batching.collect``). Only the read for the first job blocks; the window after
   it is polled without ``BLOCK``, because Redis times out blocked reads on its timer tick (100
   ms at the default ``hz 10``), which would turn a 10 ms window into ~100 ms.
3. Triage without computing: malformed entries -> dead-letter + 422; deadline passed -> 504;
   cancel key set -> dropped; unknown model -> 404; wrong op for the model -> 422.
4. Compute the rest as one ``Engine.run``; if that raises, run them one by one so one bad job
   cannot fail its batch-mates, and a job that still fails gets an error result (and is
   dead-lettered) - the worker itself never dies on input.
5. Store each result (SET result, RPUSH done, SET status; all with ``RESULT_TTL_S``), then
   ``XACK`` + ``XDEL``, all in one MULTI/EXEC: a result is never acknowledged without being stored.

While a batch computes, a heartbeat thread refreshes the ``worker:{id}`` key and re-claims the
jobs in flight for this same consumer (``XCLAIM ... JUSTID``, which does not count as a
delivery), so a slow batch is not mistaken for a dead worker. SIGTERM/SIGINT: the batch in
flight finishes and is stored, no new jobs are taken, the heartbeat key is removed, exit 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

import numpy as np
import redis
import torch
from pydantic import ValidationError

from jobqueue.protocol import CONSUMER_GROUP, Job, JobResult, Keys
from model_zoo.registry import ModelNotFoundError, WeightsIntegrityError
from worker.batching import collect
from worker.encoding import CONTENT_TYPES, EncodeOptions, encode
from worker.engine import Engine
from worker.settings import WorkerSettings

log = logging.getLogger("worker")

BLOCK_MS = 500
"""The blocking read for a batch's first job (a new job ends it at once; only an idle timeout
is rounded up to Redis' timer tick): bounds how late a stop signal is noticed while idle."""
DEAD_LETTER_MAXLEN = 1000
DEAD_LETTER_MAX_PIXEL_BYTES = 4 << 20
"""Dead-lettered entries keep their pixels (for replaying) only up to this size."""
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
OPERATIONS = {"stylize": "style", "upscale": "sr"}


@dataclass
class Entry:
    """A stream entry as delivered to this consumer."""

    entry_id: str
    fields: dict[bytes, bytes] | None
    deliveries: int = 1


@dataclass
class _Work:
    entry: Entry
    job: Job
    pixels: np.ndarray


def _seconds(value: float) -> float:
    return round(max(value, 0.0), 6)


class Worker:
    def __init__(self, settings: WorkerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.keys = Keys(settings.queue_prefix)
        self.worker_id = settings.worker_id
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=max(10.0, 4 * BLOCK_MS / 1000),
            socket_connect_timeout=5.0,
            health_check_interval=30,
        )
        self.encode_options = EncodeOptions(
            png_compress_level=settings.png_compress_level,
            jpeg_quality=settings.jpeg_quality,
            webp_quality=settings.webp_quality,
        )
        self.stopping = threading.Event()
        self.heartbeat_done = threading.Event()
        self.in_flight: set[str] = set()
        self.lock = threading.Lock()
        self.jobs_done = 0
        self.jobs_failed = 0
        self.started_at = time.time()
        self.claim_cursor = "0-0"
        self.last_claim = 0.0
        self.claim_every_s = min(settings.claim_idle_ms / 2000, 5.0)

    # ------------------------------------------------------------------------ lifecycle

    def install_signal_handlers(self) -> None:
        def handle(signum: int, _frame: FrameType | None) -> None:
            if self.stopping.is_set():
                log.warning(
                    "second %s: exiting now, in-flight jobs will be reclaimed",
                    signal.Signals(signum).name,
                )
                os._exit(1)
            log.info("%s: finishing the batch in flight, then exiting", signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def ensure_group(self) -> None:
        """Create the consumer group (and stream). From id 0: jobs queued before any worker
        existed are served too (processed entries are deleted, so 0 means "all waiting")."""
        try:
            self.redis.xgroup_create(self.keys.stream, CONSUMER_GROUP, id="0", mkstream=True)
            log.info("created consumer group %s on %s", CONSUMER_GROUP, self.keys.stream)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self) -> int:
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        backoff = 0.1
        group_ready = False
        beat.start()
        try:
            while not self.stopping.is_set():
                try:
                    if not group_ready:
                        self.ensure_group()
                        group_ready = True
                    entries, isolate = self.next_batch()
                    for batch in [[e] for e in entries] if isolate else [entries]:
                        if batch:
                            self.process(batch)
                    backoff = 0.1
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    self._forget_in_flight()
                    log.warning("redis unavailable (%s); retrying in %.1fs", exc, backoff)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                except redis.ResponseError as exc:
                    self._forget_in_flight()
                    if "NOGROUP" in str(exc):  # Redis restarted empty or the stream was deleted.
                        group_ready = False
                        continue
                    log.exception("redis error")
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                except Exception:
                    # A bug, not bad input (that is answered in process()). Keep serving; the
                    # batch's jobs become claimable again and, if they keep failing, end in
                    # the dead-letter stream rather than taking the worker down.
                    self._forget_in_flight()
                    log.exception("unexpected error while processing a batch")
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            self.heartbeat_done.set()
            beat.join(timeout=5)
            with contextlib.suppress(redis.RedisError):
                self.redis.delete(self.keys.heartbeat(self.worker_id))
        log.info("stopped after %d jobs (%d failed)", self.jobs_done, self.jobs_failed)
        return 0

    # ------------------------------------------------------------------------ heartbeat

    def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while True:
            try:
                self._beat()
            except redis.RedisError as exc:
                log.debug("heartbeat failed: %s", exc)
            except Exception:  # the heartbeat must outlive any surprise
                log.exception("heartbeat failed")
            if self.heartbeat_done.wait(interval):
                return

    def _beat(self) -> None:
        key = self.keys.heartbeat(self.worker_id)
        if self.stopping.is_set():
            self.redis.delete(key)  # draining: no longer a worker that takes jobs
        else:
            info = {
                "worker_id": self.worker_id,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "models": sorted(list(self.engine.models)),
                "device": str(self.engine.device),
                "precision": self.engine.precision,
                "max_batch_pixels": self.engine.max_batch_pixels,
                "started_at": self.started_at,
                "jobs_done": self.jobs_done,
                "jobs_failed": self.jobs_failed,
                "in_flight": len(self.in_flight),
            }
            self.redis.set(key, json.dumps(info), px=self.settings.heartbeat_ttl_ms)
        with self.lock:
            ids = set(self.in_flight)
        if ids:
            pending = self.redis.xpending_range(
                self.keys.stream,
                CONSUMER_GROUP,
                "-",
                "+",
                count=10_000,
                consumername=self.worker_id,
            )
            mine = [p["message_id"] for p in pending if p["message_id"].decode() in ids]
            if mine:
                self.redis.xclaim(
                    self.keys.stream,
                    CONSUMER_GROUP,
                    self.worker_id,
                    min_idle_time=0,
                    message_ids=mine,
                    justid=True,
                )

    # -------------------------------------------------------------------------- reading

    def next_batch(self) -> tuple[list[Entry], bool]:
        """Reclaimed jobs first (to be run one at a time), else fresh ones."""
        now = time.monotonic()
        if now - self.last_claim >= self.claim_every_s:
            self.last_claim = now
            claimed = self.reclaim()
            if claimed:
                return claimed, True
        entries = collect(
            self._read_new,
            max_batch=self.settings.max_batch,
            max_wait_ms=self.settings.max_wait_ms,
            block_ms=BLOCK_MS,
            should_stop=self.stopping.is_set,
        )
        return entries, False

    def _read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        """Up to ``count`` new entries; ``block_ms=None`` does not block (see ``collect``)."""
        response = self.redis.xreadgroup(
            CONSUMER_GROUP, self.worker_id, {self.keys.stream: ">"}, count=count, block=block_ms
        )
        entries = [
            Entry(entry_id.decode(), fields or None)
            for _stream, messages in (response or [])
            for entry_id, fields in messages
        ]
        self._track(entries)
        return entries

    def reclaim(self) -> list[Entry]:
        response = self.redis.xautoclaim(
            self.keys.stream,
            CONSUMER_GROUP,
            self.worker_id,
            min_idle_time=self.settings.claim_idle_ms,
            start_id=self.claim_cursor,
            count=self.settings.max_batch,
        )
        cursor, messages = response[0], response[1]
        self.claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        entries = [Entry(entry_id.decode(), fields or None) for entry_id, fields in messages]
        if not entries:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry in entries:
            pipe.xpending_range(self.keys.stream, CONSUMER_GROUP, entry.entry_id, entry.entry_id, 1)
        for entry, info in zip(entries, pipe.execute(), strict=True):
            entry.deliveries = int(info[0]["times_delivered"]) if info else 1
        log.info(
            "reclaimed %d job(s) idle > %d ms: %s",
            len(entries),
            self.settings.claim_idle_ms,
            ", ".join(f"{e.entry_id} (delivery {e.deliveries})" for e in entries),
        )
        self._track(entries)
        return entries

    def _track(self, entries: list[Entry]) -> None:
        with self.lock:
            self.in_flight.update(e.entry_id for e in entries)

    def _forget_in_flight(self) -> None:
        """Stop refreshing jobs we read but could not finish (Redis failed mid-batch), so that
        they become claimable after ``CLAIM_IDLE_MS`` - by us or another worker."""
        with self.lock:
            self.in_flight.clear()

    # ----------------------------------------------------------------------- processing

    def process(self, entries: list[Entry]) -> None:
        """Triage, compute and answer ``entries``, then acknowledge them in the same
        transaction as their results."""
        try:
            pipe = self.redis.pipeline(transaction=True)
            work = self._triage(entries, pipe)
            if work:
                self._set_status([w.job.job_id for w in work], "running")
                self._compute(work, pipe)
            ids = [e.entry_id for e in entries]
            pipe.xack(self.keys.stream, CONSUMER_GROUP, *ids)
            pipe.xdel(self.keys.stream, *ids)
            pipe.execute()
        finally:
            with self.lock:
                self.in_flight.difference_update(e.entry_id for e in entries)

    def _triage(self, entries: list[Entry], pipe: redis.client.Pipeline) -> list[_Work]:
        """Everything that can be decided without computing; returns the jobs to compute."""
        parsed: list[tuple[Entry, Job]] = []
        for entry in entries:
            if not entry.fields:
                continue  # deleted while pending: nothing to do but acknowledge
            try:
                job = Job.from_fields(entry.fields)
            except ValueError as exc:
                self._fail(
                    pipe, entry, _job_id(entry.fields), 422, f"malformed job: {exc}", dead=True
                )
                continue
            if entry.deliveries > self.settings.max_deliveries:
                self._fail(
                    pipe,
                    entry,
                    job.job_id,
                    503,
                    f"job abandoned: its worker died {entry.deliveries - 1} times while "
                    "computing it",
                    dead=True,
                )
                continue
            if job.output_format not in CONTENT_TYPES or job.op not in OPERATIONS:
                self._fail(
                    pipe,
                    entry,
                    job.job_id,
                    422,
                    f"malformed job: op {job.op!r} / output_format {job.output_format!r}",
                    dead=True,
                )
                continue
            parsed.append((entry, job))
        if not parsed:
            return []

        check = self.redis.pipeline(transaction=False)
        for _entry, job in parsed:
            check.exists(self.keys.cancel(job.job_id))
            check.exists(self.keys.result(job.job_id))
        flags = check.execute()
        now = time.time()
        work: list[_Work] = []
        for k, (entry, job) in enumerate(parsed):
            cancelled, has_result = flags[2 * k], flags[2 * k + 1]
            if cancelled:
                log.info("job %s cancelled by its caller: not computed", job.job_id)
                continue
            if entry.deliveries > 1 and has_result:
                continue  # stored by a worker that died before acknowledging
            if job.deadline and now > job.deadline:
                log.info(
                    "job %s: deadline passed %.2fs ago: not computed",
                    job.job_id,
                    now - job.deadline,
                )
                self._fail(
                    pipe,
                    entry,
                    job.job_id,
                    504,
                    "deadline passed before a worker was free; not computed",
                    queue=now - job.enqueued_at,
                )
                continue
            try:
                model = self.engine.model(job.model)
            except ModelNotFoundError as exc:
                self._fail(pipe, entry, job.job_id, 404, str(exc))
                continue
            except Exception as exc:  # corrupt weights, unreadable zoo: not the caller's fault
                log.error("model %s unavailable: %s", job.model, exc)
                self._fail(pipe, entry, job.job_id, 503, f"model {job.model!r} unavailable")
                continue
            if model.kind != OPERATIONS[job.op]:
                verb = "upscale" if model.kind == "sr" else "stylize"
                self._fail(
                    pipe,
                    entry,
                    job.job_id,
                    422,
                    f"model {job.model!r} is a {model.kind} model: use {verb}",
                )
                continue
            pixels = np.frombuffer(job.pixels, dtype=np.uint8).reshape(
                job.height, job.width, job.channels
            )
            work.append(_Work(entry, job, pixels))
        return work

    def _compute(self, work: list[_Work], pipe: redis.client.Pipeline) -> None:
        started_wall = time.time()
        started = time.perf_counter()
        try:
            outputs = self.engine.run([(w.job.model, w.pixels, w.job.controls) for w in work])
            compute = time.perf_counter() - started
            results = [(w, out, compute) for w, out in zip(work, outputs, strict=True)]
        except Exception:
            if len(work) > 1:
                log.exception("batch of %d failed; retrying its jobs one by one", len(work))
            results = []
            for w in work:
                single_started = time.perf_counter()
                try:
                    (output,) = self.engine.run([(w.job.model, w.pixels, w.job.controls)])
                except Exception as exc:
                    if len(work) == 1:
                        log.exception("job %s failed", w.job.job_id)
                    status, message = _compute_error(w.job, exc)
                    self._fail(
                        pipe,
                        w.entry,
                        w.job.job_id,
                        status,
                        message,
                        dead=True,
                        queue=started_wall - w.job.enqueued_at,
                    )
                    continue
                results.append((w, output, time.perf_counter() - single_started))
        for w, output, compute in results:
            encode_started = time.perf_counter()
            try:
                image, content_type = encode(
                    output.pixels, w.job.output_format, self.encode_options
                )
            except Exception as exc:
                log.exception("encoding job %s failed", w.job.job_id)
                self._fail(
                    pipe,
                    w.entry,
                    w.job.job_id,
                    422,
                    f"could not encode the result as {w.job.output_format}: {exc}",
                    dead=True,
                )
                continue
            timings = {
                "queue": _seconds(started_wall - w.job.enqueued_at),
                "compute": _seconds(compute),
                "encode": _seconds(time.perf_counter() - encode_started),
                "batch_size": float(output.batch_size),
            }
            result = JobResult(w.job.job_id, True, content_type, image, timings=timings)
            self._store(pipe, w.job.job_id, result)
            self.jobs_done += 1
        if results:
            log.info(
                "computed %d job(s) in %.3fs: %s",
                len(results),
                time.perf_counter() - started,
                ", ".join(
                    f"{w.job.job_id} ({w.job.model} {w.job.width}x{w.job.height} bs={o.batch_size})"
                    for w, o, _ in results
                ),
            )

    # ------------------------------------------------------------------------ results

    def _set_status(self, job_ids: list[str], state: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.set(self.keys.status(job_id), state, ex=self.settings.result_ttl_s)
        pipe.execute()

    def _store(self, pipe: redis.client.Pipeline, job_id: str, result: JobResult) -> None:
        ttl = self.settings.result_ttl_s
        state = "done" if result.ok else "failed"
        pipe.set(self.keys.result(job_id), result.encode(), ex=ttl)
        pipe.rpush(self.keys.done(job_id), state)
        pipe.expire(self.keys.done(job_id), ttl)
        pipe.set(self.keys.status(job_id), state, ex=ttl)

    def _fail(
        self,
        pipe: redis.client.Pipeline,
        entry: Entry,
        job_id: str | None,
        status: int,
        message: str,
        *,
        dead: bool = False,
        queue: float | None = None,
    ) -> None:
        """An error result for the caller (when the job id is usable) and, for jobs that will
        never succeed, a copy in the dead-letter stream."""
        self.jobs_failed += 1
        log.warning("job %s (entry %s): %d %s", job_id, entry.entry_id, status, message)
        if job_id is not None:
            timings = {} if queue is None else {"queue": _seconds(queue)}
            result = JobResult(job_id, False, error=message, status_code=status, timings=timings)
            self._store(pipe, job_id, result)
        if dead:
            fields = dict(entry.fields or {})
            pixels = fields.get(b"pixels", b"")
            if len(pixels) > DEAD_LETTER_MAX_PIXEL_BYTES:
                fields[b"pixels"] = b""
                fields[b"pixels_dropped_bytes"] = str(len(pixels)).encode()
            fields.update(
                {
                    b"dead_reason": message.encode(),
                    b"dead_status": str(status).encode(),
                    b"dead_source_id": entry.entry_id.encode(),
                    b"dead_deliveries": str(entry.deliveries).encode(),
                    b"dead_worker": self.worker_id.encode(),
                    b"dead_at": repr(time.time()).encode(),
                }
            )
            pipe.xadd(self.keys.dead_letter, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)


def _job_id(fields: dict[bytes, bytes]) -> str | None:
    """The job id of a malformed entry, if it is usable as a key part; else nobody to answer."""
    try:
        job_id = fields[b"job_id"].decode()
    except (KeyError, UnicodeDecodeError):
        return None
    return job_id if JOB_ID_PATTERN.match(job_id) else None


def _compute_error(job: Job, exc: Exception) -> tuple[int, str]:
    """A job that fails even alone is the job's problem (422), except running out of memory,
    which another try with less load may survive (503)."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return 503, f"out of memory computing a {job.width}x{job.height} image; retry later"
    return 422, (
        f"model {job.model!r} could not process this {job.width}x{job.height} image: "
        f"{type(exc).__name__}: {exc}"
    )


def build_engine(settings: WorkerSettings) -> Engine:
    return Engine(
        zoo_dir=settings.model_zoo_dir,
        device=settings.device,
        precision=settings.precision,
        min_psnr_db=settings.min_psnr_db,
        cpu_runtime=settings.cpu_runtime,
        max_batch=settings.max_batch,
        max_batch_pixels=settings.max_batch_pixels,
        max_pad_fraction=settings.max_pad_fraction,
        tile_size=settings.tile_size,
        tile_overlap=settings.tile_overlap,
        tile_stats_size=settings.tile_stats_size,
    )


def main(argv: list[str] | None = None) -> int:
    del argv
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        print(f"worker: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker[{settings.worker_id}] %(name)s: %(message)s",
    )
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    engine = build_engine(settings)
    worker = Worker(settings, engine)
    worker.install_signal_handlers()
    try:
        names = engine.load(settings.worker_models or None)
    except ModelNotFoundError as exc:
        log.error("WORKER_MODELS: %s", exc)
        return 2
    except WeightsIntegrityError as exc:
        log.error("%s", exc)
        return 2
    if not names:
        log.warning(
            "the zoo at %s has no models: every job will get a 404",
            settings.model_zoo_dir or "(default)",
        )
    if worker.stopping.is_set():
        return 0
    log.info(
        "serving %s from %s (prefix %r, max batch %d, wait %d ms, %d px per pass)",
        ", ".join(names) or "-",
        settings.redis_url,
        settings.queue_prefix,
        settings.max_batch,
        settings.max_wait_ms,
        engine.max_batch_pixels,
    )
    return worker.run()

"""``python -m worker``: take jobs from the Redis streams, compute them in batches, store results.

How jobs are read, claimed, stored and acknowledged is ``jobqueue.consumer``'s; this module holds
the worker's decisions. One loop iteration:

1. Every ``CLAIM_IDLE_MS / 2`` (at most 5 s), take over jobs pending longer than
   ``CLAIM_IDLE_MS`` - their worker died. Reclaimed jobs run one at a time, so a job that kills
   its worker cannot take innocent batch-mates down with it again; beyond ``MAX_DELIVERIES`` it
   is dead-lettered and its caller gets a 503 instead of a hang.
2. Otherwise read the **interactive** lane: up to ``MAX_BATCH`` jobs, waiting ``MAX_WAIT_MS``
   after the first (``worker.batching``; only the read for the first job blocks, because Redis
   times out blocked reads on its 100 ms timer tick). When it is empty, take one job of the
   **bulk** lane (jobs the API estimated at ``BULK_LANE_COST_S`` or more), which runs alone.
3. Triage without computing: malformed entries -> dead-letter + 422; deadline passed -> 504;
   cancel marker set -> dropped; unknown model -> 404; wrong op for the model -> 422.
4. Compute the rest as one ``Engine.run``. Before every forward pass (so between the tiles of a
   big image) the engine asks ``_PassWatch`` which jobs to drop: those whose caller cancelled
   (504, disconnect, ``DELETE /jobs/{id}``) or whose deadline passed are stopped there, not
   computed to the end for nobody. While a bulk job runs, the same call computes any
   interactive jobs that arrived (a nested ``process``), so a big job delays small ones by one
   forward pass, not by its whole run. If the batch raises, its jobs run one by one so one bad
   job cannot fail its batch-mates; a job that still fails gets an error result (and is
   dead-lettered) - the worker itself never dies on input.
5. Store each result and acknowledge every entry in one MULTI/EXEC: a result is never
   acknowledged without being stored.

The worker measures its own cost per model (``worker.costs``: once per model between its first
jobs, so it serves as soon as its models are loaded; then from the jobs it computes) and publishes
it for the API's admission (which assumes a cost until then). A heartbeat thread refreshes the
worker's key (listing the models still ``measuring``), its claims on the jobs in flight (so a slow
batch is not mistaken for a dead worker) and the costs. SIGTERM/SIGINT: the batch in flight
finishes and is stored, no new jobs are taken, the heartbeat key is removed, exit 0. Metrics:
``worker.metrics`` on ``METRICS_PORT``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType

import numpy as np
import redis
import torch
from pydantic import ValidationError

from jobqueue.consumer import Consumer, Entry, Outcome
from jobqueue.protocol import CONTENT_TYPES, OPERATIONS, Job, JobResult, JobStatus, ModelCost
from jobqueue.settings import redacted_url
from jobqueue.telemetry import configure_logging, log_context
from model_zoo.registry import ModelNotFoundError, WeightsIntegrityError
from worker.batching import BatchWindow, fill
from worker.costs import CostTracker, fingerprint, probe, tiled_probe_side
from worker.encoding import EncodeOptions, encode
from worker.engine import Engine, EngineOutput
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings

log = logging.getLogger("worker")

BLOCK_MS = 500
"""The blocking read for a batch's first job (a new job ends it at once; only an idle timeout
is rounded up to Redis' timer tick): bounds how late a stop signal or a bulk job is noticed
while idle."""


@dataclass
class _Work:
    entry: Entry
    job: Job
    pixels: np.ndarray


def _seconds(value: float) -> float:
    return round(max(value, 0.0), 6)


@dataclass
class _PassWatch:
    """The engine's ``should_stop`` for one batch: called before every forward pass.

    Reads the batch's cancel markers (at most every ``STOP_CHECK_INTERVAL_S``) and deadlines,
    and returns the jobs to drop; times the passes; and, for a bulk batch, computes the
    interactive jobs waiting at that moment (preemption at pass boundaries)."""

    worker: Worker
    work: list[_Work]
    preempt: bool
    reasons: dict[int, str] = field(default_factory=dict)
    nested_s: float = 0.0
    passes: int = 0
    _last_pass: float | None = None
    _last_check: float = field(default_factory=time.perf_counter)

    def __call__(self) -> set[int]:
        now = time.perf_counter()
        self._end_pass(now)
        if now - self._last_check >= self.worker.settings.stop_check_interval_s:
            self._last_check = now
            self._check(time.time())
        if self.preempt and not self.worker.stopping.is_set():
            self._run_interactive()
        self._last_pass = time.perf_counter()
        self.passes += 1
        return set(self.reasons)

    def finish(self) -> None:
        self._end_pass(time.perf_counter())

    def _end_pass(self, now: float) -> None:
        if self._last_pass is not None:
            models = {w.job.model for w in self.work}
            label = models.pop() if len(models) == 1 else "mixed"
            self.worker.metrics.pass_seconds.labels(label).observe(now - self._last_pass)
            self._last_pass = None

    def _check(self, wall: float) -> None:
        # Cancel markers first: a caller that said it left needs no 504 result stored.
        open_ids = [w.job.job_id for i, w in enumerate(self.work) if i not in self.reasons]
        try:
            cancelled = self.worker.consumer.cancelled(open_ids)
        except redis.RedisError as exc:  # keep computing; the next check may get through
            log.warning("cancel check failed: %s", exc)
            cancelled = set()
        for index, w in enumerate(self.work):
            if index in self.reasons:
                continue
            if w.job.job_id in cancelled:
                self.reasons[index] = "cancelled"
            elif w.job.deadline and wall > w.job.deadline:
                self.reasons[index] = "deadline"

    def _run_interactive(self) -> None:
        started = time.perf_counter()
        try:
            entries = self.worker.consumer.read("interactive", self.worker.settings.max_batch, None)
            if entries:
                self.worker.metrics.preemptions.inc()
                log.info("bulk job paused for %d interactive job(s)", len(entries))
                self.worker.process(entries, nested=True)
        except Exception:  # the bulk job goes on; unfinished entries are reclaimed later
            log.exception("interactive jobs inside a bulk job failed")
        self.nested_s += time.perf_counter() - started


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        consumer: Consumer | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.worker_id = settings.worker_id
        self.consumer = consumer or Consumer.from_settings(settings, settings.worker_id)
        self.keys = self.consumer.keys
        self.metrics = metrics or WorkerMetrics()
        self.costs = CostTracker(self.worker_id, str(engine.device))
        self.encode_options = EncodeOptions(
            png_compress_level=settings.png_compress_level,
            jpeg_quality=settings.jpeg_quality,
            webp_quality=settings.webp_quality,
        )
        self.stopping = threading.Event()
        self.heartbeat_done = threading.Event()
        self.jobs_done = 0
        self.jobs_failed = 0
        self.started_at = time.time()
        self.last_claim = 0.0
        self.batch_window = BatchWindow(
            settings.batch_window,
            fruitless_to_close=settings.batch_window_close_after,
            probe_every=settings.batch_window_probe_every,
        )
        self.encoder = ThreadPoolExecutor(
            max_workers=settings.resolved_encode_threads(), thread_name_prefix="encode"
        )
        self.claim_every_s = min(settings.claim_idle_ms / 2000, 5.0)
        self.unmeasured: list[str] = []
        """Models whose cost is neither measured nor adopted yet: ``run`` measures one after
        each batch (a job waits for at most one probe, not for all of them; on a 2-core CPU
        they were ~70 % of the start-up), and the heartbeat lists them as ``measuring``."""
        self._probe_deadlines: dict[str, float] = {}

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
        if self.consumer.ensure_groups():
            log.info("created consumer group on %s", ", ".join(self.keys.streams))

    def measure_costs(self, names: list[str]) -> None:
        """Measure (or adopt) the cost of each of ``names`` now, waiting where another worker
        is measuring one. ``run`` does the same between jobs instead (``unmeasured``)."""
        self.unmeasured = list(names)
        while self.unmeasured and not self.stopping.is_set():
            if not self.measure_next_cost():
                self.stopping.wait(0.25)  # another worker is probing it: wait for its figure

    def measure_next_cost(self) -> bool:
        """Time one pass of the first model in ``unmeasured`` (``worker.costs.probe``) so the
        API can admit its jobs by cost, unless a worker with the same fingerprint published
        the figure or is measuring it now (``worker.costs``, module docstring). Each figure is
        published as soon as it is known: other starting workers may be waiting for it.
        Returns False when another worker holds that model's probe (it goes to the back of
        the list, to be asked again); a model that cannot be probed is still served."""
        name = self.unmeasured[0]
        try:
            done = self._measure_cost(name)
        except Exception:
            log.exception("could not measure the cost of %s", name)
            done = True
        self.unmeasured.remove(name)
        if not done:
            self.unmeasured.append(name)
            return False
        cost = self.costs.get(name)
        if cost is not None:
            self.metrics.cost.labels(name).set(cost.seconds_per_megapixel)
            log.info(
                "model %s costs %.3f s per output megapixel (tiled, above %d px input: %s)",
                name,
                cost.seconds_per_megapixel,
                cost.tile_input_side,
                f"{cost.tiled_seconds_per_megapixel:.3f}" if cost.tiled_samples else "-",
            )
        with contextlib.suppress(redis.RedisError):
            self.consumer.publish_costs(self.costs.take_changes())
        return True

    def _measure_cost(self, name: str) -> bool:
        """Adopt a published figure for ``name`` with this worker's fingerprint; else claim
        the probe and run it. False: another worker claimed it, and its figure is awaited (up
        to ``cost_probe_wait_s`` from the first ask, then this worker probes it itself)."""
        if self.stopping.is_set():
            return True
        tiling = self.engine.tiling(name)
        tiled_side = tiled_probe_side(self.engine, name, self.settings.cost_probe_tiled_scale)
        mark = fingerprint(self.engine, name)
        if not self.settings.cost_probe_reuse:
            self._probe_cost(name, tiling, tiled_side, mark)
            return True
        ttl_ms = max(1, int(self.settings.cost_probe_wait_s * 1000))
        deadline = self._probe_deadlines.setdefault(
            name, time.monotonic() + self.settings.cost_probe_wait_s
        )

        def published() -> ModelCost | None:
            known = self.consumer.read_cost(name)
            if known is None or known.fingerprint != mark:
                return None
            return known if known.tiled_samples > 0 or not tiled_side else None

        claimed = False
        try:
            known = published()
            if known is None and self.consumer.claim_cost_probe(name, mark, ttl_ms):
                # Read again: the claim may have been free because its holder had just
                # published the figure and let go.
                known = published()
                claimed = known is None
                if not claimed:
                    self.consumer.release_cost_probe(name, mark)
        except redis.RedisError as exc:
            log.warning("could not read or claim the cost of %s (%s): probing", name, exc)
        else:
            if known is not None:
                self.costs.adopt(known)
                log.info("model %s: adopted the cost worker %s measured", name, known.worker)
                return True
            if not claimed and time.monotonic() < deadline:
                return False
        try:
            self._probe_cost(name, tiling, tiled_side, mark)
            if claimed:  # published before the claim goes, so no waiter finds neither
                with contextlib.suppress(redis.RedisError):
                    self.consumer.publish_costs(self.costs.take_changes())
        finally:
            if claimed:
                with contextlib.suppress(redis.RedisError):
                    self.consumer.release_cost_probe(name, mark)
        return True

    def _probe_cost(self, name: str, tiling: tuple[int, int], tiled_side: int, mark: str) -> None:
        """Time ``name`` on a whole image and, where it tiles, on tiles."""
        seconds, pixels = probe(self.engine, name, self.settings.cost_probe_side)
        self.costs.record(name, seconds, pixels, probe=True, tiling=tiling, fingerprint=mark)
        if tiled_side:
            seconds, pixels = probe(self.engine, name, tiled_side, tiled=True)
            self.costs.record(name, seconds, pixels, probe=True, tiled=True)

    def run(self) -> int:
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        backoff = 0.1
        group_ready = False
        probe_next = bool(self.unmeasured)
        beat.start()
        try:
            while not self.stopping.is_set():
                try:
                    if not group_ready:
                        self.ensure_group()
                        group_ready = True
                    # While costs are unmeasured, the read does not block: no job -> a probe.
                    entries, isolate = self.next_batch(None if probe_next else BLOCK_MS)
                    for batch in [[e] for e in entries] if isolate else [entries]:
                        if batch:
                            self.process(batch)
                    if self.unmeasured and not self.stopping.is_set():
                        # A model another worker is probing is asked again after a blocking
                        # read (up to BLOCK_MS), rather than in a busy loop.
                        probe_next = self.measure_next_cost()
                    else:
                        probe_next = False
                    backoff = 0.1
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    self.consumer.forget_in_flight()
                    log.warning("redis unavailable (%s); retrying in %.1fs", exc, backoff)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                except redis.ResponseError as exc:
                    self.consumer.forget_in_flight()
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
                    self.consumer.forget_in_flight()
                    log.exception("unexpected error while processing a batch")
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            self.heartbeat_done.set()
            self.encoder.shutdown(wait=True)
            beat.join(timeout=5)
            with contextlib.suppress(redis.RedisError):
                self.consumer.remove_heartbeat()
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
        if self.stopping.is_set():
            self.consumer.remove_heartbeat()  # draining: no longer a worker that takes jobs
        else:
            info = {
                "worker_id": self.worker_id,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "models": sorted(self.engine.models),
                "device": str(self.engine.device),
                "precision": self.engine.precision,
                "model_precision": {n: m.precision for n, m in self.engine.models.items()},
                "model_full_precision_head": {
                    n: m.full_precision_head for n, m in self.engine.models.items()
                },
                "max_batch_pixels": self.engine.max_batch_pixels,
                "started_at": self.started_at,
                "jobs_done": self.jobs_done,
                "jobs_failed": self.jobs_failed,
                "in_flight": self.consumer.in_flight,
                "measuring": list(self.unmeasured),
            }
            self.consumer.heartbeat(info, self.settings.heartbeat_ttl_ms)
        self.metrics.in_flight.set(self.consumer.in_flight)
        self.consumer.refresh_claims()
        changed = self.costs.take_changes()
        if changed:
            self.consumer.publish_costs(changed)

    # -------------------------------------------------------------------------- reading

    def next_batch(self, block_ms: int | None = BLOCK_MS) -> tuple[list[Entry], bool]:
        """Reclaimed jobs first (run one at a time), then interactive ones (batched), then one
        bulk job (alone). The bool says whether to run the entries one at a time. ``block_ms``:
        how long to wait for a first job when none is queued (None: not at all)."""
        now = time.monotonic()
        if now - self.last_claim >= self.claim_every_s:
            self.last_claim = now
            claimed = self.consumer.reclaim(self.settings.max_batch)
            if claimed:
                log.info(
                    "reclaimed %d job(s) idle > %d ms: %s",
                    len(claimed),
                    self.settings.claim_idle_ms,
                    ", ".join(f"{e.entry_id} (delivery {e.deliveries})" for e in claimed),
                )
                return claimed, True
        settings = self.settings
        entries = self._read_interactive(settings.max_batch, None)
        if not entries:
            bulk = self.consumer.read("bulk", 1, None)
            if bulk:
                return bulk, True
            if block_ms is None:
                return [], False
            # Block for the first job; the window after it is polled (``worker.batching``).
            entries = self._read_interactive(settings.max_batch, block_ms)
        if not entries:
            return [], False
        return self._fill_batch(entries), False

    def _fill_batch(self, entries: list[Entry]) -> list[Entry]:
        """Wait for batch-mates of ``entries`` as long as ``BATCH_WINDOW`` says it pays."""
        settings = self.settings
        in_hand = len(entries)
        if in_hand >= settings.max_batch:
            return entries
        wait_ms = self.batch_window.wait_ms(
            in_hand, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms
        )
        filled = fill(
            entries,
            self._read_interactive,
            max_batch=settings.max_batch,
            max_wait_ms=wait_ms,
            should_stop=self.stopping.is_set,
        )
        outcome = self.batch_window.record(in_hand, len(filled) - in_hand, wait_ms)
        self.metrics.batch_windows.labels(outcome).inc()
        return filled

    def _read_interactive(self, count: int, block_ms: int | None) -> list[Entry]:
        return self.consumer.read("interactive", count, block_ms)

    # ----------------------------------------------------------------------- processing

    def process(self, entries: list[Entry], *, nested: bool = False) -> None:
        """Triage, compute and answer ``entries``, then acknowledge them in the same
        transaction as their results. ``nested``: called between the passes of a bulk job."""
        try:
            outcome = self.consumer.outcome()
            work = self._triage(entries, outcome)
            if work:
                self.consumer.set_status(
                    JobStatus.for_job(w.job, "running", self.worker_id) for w in work
                )
                preempt = not nested and any(w.job.lane == "bulk" for w in work)
                self._compute(work, outcome, preempt=preempt)
            outcome.commit(entries)
        finally:
            self.consumer.release(entries)

    def _triage(self, entries: list[Entry], outcome: Outcome) -> list[_Work]:
        """Everything that can be decided without computing; returns the jobs to compute."""
        parsed: list[tuple[Entry, Job]] = []
        for entry in entries:
            if not entry.fields:
                continue  # deleted while pending: nothing to do but acknowledge
            try:
                job = Job.from_fields(entry.fields)
            except ValueError as exc:
                self._fail(outcome, entry, entry.job_id(), 422, f"malformed job: {exc}",
                           dead=True, code="malformed_job")  # fmt: skip
                continue
            if entry.deliveries > self.settings.max_deliveries:
                self._fail(
                    outcome,
                    entry,
                    job,
                    503,
                    f"job abandoned: its worker died {entry.deliveries - 1} times while "
                    "computing it",
                    dead=True,
                    code="job_abandoned",
                )
                continue
            if job.output_format not in CONTENT_TYPES or job.op not in OPERATIONS:
                self._fail(
                    outcome,
                    entry,
                    job,
                    422,
                    f"malformed job: op {job.op!r} / output_format {job.output_format!r}",
                    dead=True,
                    code="malformed_job",
                )
                continue
            parsed.append((entry, job))
        if not parsed:
            return []

        ids = [job.job_id for _, job in parsed]
        cancelled = self.consumer.cancelled(ids)
        stored = self.consumer.stored(ids)
        now = time.time()
        work: list[_Work] = []
        for entry, job in parsed:
            with log_context(request_id=job.request_id, job_id=job.job_id):
                if job.job_id in cancelled:
                    log.info("job %s cancelled by its caller: not computed", job.job_id)
                    outcome.mark(JobStatus.for_job(job, "cancelled", self.worker_id))
                    self.metrics.jobs.labels(job.model, "cancelled").inc()
                    continue
                if entry.deliveries > 1 and job.job_id in stored:
                    continue  # stored by a worker that died before acknowledging
                if job.deadline and now > job.deadline:
                    log.info("job %s: deadline passed %.2fs ago: not computed", job.job_id,
                             now - job.deadline)  # fmt: skip
                    self._fail(
                        outcome,
                        entry,
                        job,
                        504,
                        "deadline passed before a worker was free; not computed",
                        queue=now - job.enqueued_at,
                        code="deadline_exceeded",
                        metric="expired",
                    )
                    continue
                try:
                    model = self.engine.model(job.model)
                except ModelNotFoundError as exc:
                    self._fail(outcome, entry, job, 404, str(exc), code="unknown_model")
                    continue
                except Exception as exc:  # corrupt weights, unreadable zoo: not the caller's
                    log.error("model %s unavailable: %s", job.model, exc)
                    self._fail(outcome, entry, job, 503, f"model {job.model!r} unavailable",
                               code="model_unavailable")  # fmt: skip
                    continue
                if model.kind != OPERATIONS[job.op]:
                    verb = "upscale" if model.kind == "sr" else "stylize"
                    self._fail(
                        outcome,
                        entry,
                        job,
                        422,
                        f"model {job.model!r} is a {model.kind} model: use {verb}",
                        code="model_kind_mismatch",
                    )
                    continue
            pixels = np.frombuffer(job.pixels, dtype=np.uint8).reshape(
                job.height, job.width, job.channels
            )
            work.append(_Work(entry, job, pixels))
        return work

    def _compute(self, work: list[_Work], outcome: Outcome, *, preempt: bool) -> None:
        started_wall = time.time()
        started = time.perf_counter()
        watch = _PassWatch(self, work, preempt)
        requests = [(w.job.model, w.pixels, w.job.controls) for w in work]
        results: list[tuple[int, EngineOutput, float]] = []
        try:
            outputs = self.engine.run(requests, should_stop=watch)
            watch.finish()
            compute = time.perf_counter() - started - watch.nested_s
            results = [(i, out, compute) for i, out in enumerate(outputs)]
            self._learn_cost(work, outputs, compute)
        except Exception:
            watch.finish()
            if len(work) > 1:
                log.exception("batch of %d failed; retrying its jobs one by one", len(work))
            for index, w in enumerate(work):
                if index in watch.reasons:
                    results.append((index, _stopped_output(w), 0.0))
                    continue
                single_started = time.perf_counter()
                single = _PassWatch(self, [w], preempt)
                try:
                    (output,) = self.engine.run([requests[index]], should_stop=single)
                except Exception as exc:
                    with log_context(request_id=w.job.request_id, job_id=w.job.job_id):
                        if len(work) == 1:
                            log.exception("job %s failed", w.job.job_id)
                        status, message = _compute_error(w.job, exc)
                        self._fail(
                            outcome,
                            w.entry,
                            w.job,
                            status,
                            message,
                            dead=True,
                            queue=started_wall - w.job.enqueued_at,
                            code="out_of_memory" if status == 503 else "compute_failed",
                        )
                    continue
                if 0 in single.reasons:
                    watch.reasons[index] = single.reasons[0]
                compute = time.perf_counter() - single_started - single.nested_s
                results.append((index, output, compute))
        self.metrics.batch_size.observe(len(work))
        # Encoding is CPU work the forward pass does not share: a batch's results are encoded
        # at once (ENCODE_THREADS), then answered in order.
        encodings = {
            index: self.encoder.submit(self._encode, output, work[index].job.output_format)
            for index, output, _ in results
            if not output.stopped
        }
        for index, output, compute in results:
            w = work[index]
            with log_context(request_id=w.job.request_id, job_id=w.job.job_id):
                self.metrics.queue_wait.labels(w.job.model).observe(
                    max(0.0, started_wall - w.job.enqueued_at)
                )
                if output.stopped:
                    self._stopped(outcome, w, watch.reasons.get(index, "cancelled"), watch)
                else:
                    self._answer(outcome, w, encodings[index], output, compute, started_wall)

    def _learn_cost(self, work: list[_Work], outputs: list[EngineOutput], compute: float) -> None:
        """A batch of one model, all finished, updates that model's measured cost."""
        models = {w.job.model for w in work}
        if len(models) != 1 or any(o.stopped for o in outputs):
            return
        tiled = {o.tiled for o in outputs}
        if len(tiled) != 1:  # whole and tiled images in one batch: their shares are unknown
            return
        (model,) = models
        pixels = sum(int(o.pixels.shape[0] * o.pixels.shape[1]) for o in outputs)
        self.costs.record(model, compute, pixels, tiled=tiled.pop())
        cost = self.costs.get(model)
        if cost is not None:
            self.metrics.cost.labels(model).set(cost.seconds_per_megapixel)

    def _encode(self, output: EngineOutput, fmt: str) -> tuple[bytes, str, float]:
        """One result's bytes, content type and encode seconds (runs on the encode pool)."""
        started = time.perf_counter()
        image, content_type = encode(output.pixels, fmt, self.encode_options)
        return image, content_type, time.perf_counter() - started

    def _answer(
        self,
        outcome: Outcome,
        w: _Work,
        encoding: Future[tuple[bytes, str, float]],
        output: EngineOutput,
        compute: float,
        started: float,
    ) -> None:
        try:
            image, content_type, encode_s = encoding.result()
        except Exception as exc:
            log.exception("encoding job %s failed", w.job.job_id)
            self._fail(
                outcome,
                w.entry,
                w.job,
                422,
                f"could not encode the result as {w.job.output_format}: {exc}",
                dead=True,
                code="encode_failed",
            )
            return
        timings = {
            "queue": _seconds(started - w.job.enqueued_at),
            "compute": _seconds(compute),
            "encode": _seconds(encode_s),
            "batch_size": float(output.batch_size),
        }
        result = JobResult(
            w.job.job_id, True, content_type, image, timings=timings, finished_at=time.time()
        )
        outcome.store(result, JobStatus.for_job(w.job, "done", self.worker_id))
        self.jobs_done += 1
        self.metrics.jobs.labels(w.job.model, "ok").inc()
        self.metrics.encode_seconds.labels(w.job.model).observe(encode_s)
        self.metrics.batch_seconds.labels(w.job.model).observe(compute)
        height, width = output.pixels.shape[:2]
        log.info(
            "computed %s %s -> %dx%d in %.3fs (queue %.3fs, batch %d)",
            w.job.model,
            f"{w.job.width}x{w.job.height}",
            width,
            height,
            compute,
            timings["queue"],
            output.batch_size,
            extra={"model": w.job.model, "lane": w.job.lane, "outcome": "ok", **timings},
        )

    def _stopped(self, outcome: Outcome, w: _Work, reason: str, watch: _PassWatch) -> None:
        """A job dropped between forward passes: nobody is waiting for its result."""
        self.metrics.stopped.labels(w.job.model, reason).inc()
        elapsed = time.time() - w.job.enqueued_at
        if reason == "cancelled":
            log.info(
                "job %s cancelled by its caller while running: stopped after %d pass(es)",
                w.job.job_id,
                watch.passes,
                extra={"model": w.job.model, "outcome": "cancelled"},
            )
            outcome.mark(JobStatus.for_job(w.job, "cancelled", self.worker_id))
            self.metrics.jobs.labels(w.job.model, "cancelled").inc()
            return
        log.info("job %s: deadline passed while running: stopped after %d pass(es)",
                 w.job.job_id, watch.passes)  # fmt: skip
        self._fail(
            outcome,
            w.entry,
            w.job,
            504,
            f"deadline passed while computing ({elapsed:.1f} s after it was queued); stopped",
            code="deadline_exceeded",
            metric="expired",
        )

    # ------------------------------------------------------------------------ results

    def _fail(
        self,
        outcome: Outcome,
        entry: Entry,
        job: Job | str | None,
        status: int,
        message: str,
        *,
        dead: bool = False,
        queue: float | None = None,
        code: str = "",
        metric: str = "failed",
    ) -> None:
        """An error result for the caller (when the job id is usable) and, for jobs that will
        never succeed, a copy in the dead-letter stream."""
        self.jobs_failed += 1
        job_id = job.job_id if isinstance(job, Job) else job
        model = job.model if isinstance(job, Job) else "unknown"
        log.warning("job %s (entry %s): %d %s", job_id, entry.entry_id, status, message,
                    extra={"outcome": metric, "status": status})  # fmt: skip
        if job_id is not None:
            timings = {} if queue is None else {"queue": _seconds(queue)}
            result = JobResult(
                job_id,
                False,
                error=message,
                status_code=status,
                timings=timings,
                finished_at=time.time(),
                code=code,
            )
            record = (
                JobStatus.for_job(job, "failed", self.worker_id)
                if isinstance(job, Job)
                else JobStatus("failed", job_id=job_id, worker=self.worker_id)
            )
            outcome.store(result, record)
        if dead:
            outcome.dead_letter(entry, status, message)
        # Only zoo names become label values: a malformed entry's model name could be anything.
        label = model if model in self.engine.models else "unknown"
        self.metrics.jobs.labels(label, "dead_lettered" if dead else metric).inc()


def _stopped_output(w: _Work) -> EngineOutput:
    return EngineOutput(np.zeros((0, 0, w.job.channels), np.uint8), 1, stopped=True)


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
        whole_max_pixels=settings.whole_max_pixels,
    )


def _cuda_memory(kind: str) -> float:
    if kind == "allocated":
        return float(torch.cuda.memory_allocated())
    if kind == "reserved":
        return float(torch.cuda.memory_reserved())
    return float(torch.cuda.max_memory_allocated())


def main(argv: list[str] | None = None) -> int:
    del argv
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        print(f"worker: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, "worker",
                      worker_id=settings.worker_id)  # fmt: skip
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
    worker.unmeasured = list(names)  # measured between jobs (``Worker.run``)
    if engine.device.type == "cuda":
        worker.metrics.watch_gpu(_cuda_memory)
    worker.metrics.serve(settings.metrics_host, settings.metrics_port)
    log.info(
        "serving %s from %s (prefix %r, max batch %d, wait %d ms (%s), %d px per pass, "
        "%d encode threads; measuring costs between jobs)",
        ", ".join(names) or "-",
        redacted_url(settings.redis_url),
        settings.queue_prefix,
        settings.max_batch,
        settings.max_wait_ms,
        settings.batch_window,
        engine.max_batch_pixels,
        settings.resolved_encode_threads(),
    )
    return worker.run()

"""The worker's side of the Redis contract (``jobqueue.protocol``): read, reclaim, keep claims
alive, check cancel markers, store results, dead-letter and acknowledge. Synchronous (redis-py),
for the worker's loop and its heartbeat thread.

What the worker decides (batching, which error a job gets, when to stop a job) stays in
``worker.main``; everything here is how those decisions are written to Redis, so a second queue
backend would replace this module and ``jobqueue.client`` only.

Guarantees kept here:

* **At-least-once**: a job is acknowledged (``XACK`` + ``XDEL``) only in the same MULTI/EXEC that
  stores its result (``Outcome.commit``).
* **Takeover**: ``reclaim`` takes jobs pending longer than ``claim_idle_ms`` (their worker died)
  with ``XAUTOCLAIM``, with their delivery counts; ``refresh_claims`` (the heartbeat) re-claims
  this consumer's in-flight jobs with ``XCLAIM ... JUSTID``, which resets their idle time without
  counting a delivery, so a slow job is never mistaken for a dead worker's.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from jobqueue.protocol import (
    CONSUMER_GROUP,
    JOB_ID_RE,
    LANES,
    JobResult,
    JobStatus,
    Keys,
    Lane,
    ModelCost,
    backlog_member,
    decode_costs,
)

_RELEASE_IF_OWNER_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

DEAD_LETTER_MAXLEN = 1000
DEAD_LETTER_MAX_PIXEL_BYTES = 4 << 20
"""Dead-lettered entries keep their pixels (for replaying) only up to this size."""


@dataclass
class Entry:
    """A stream entry as delivered to this consumer."""

    entry_id: str
    fields: dict[bytes, bytes] | None
    deliveries: int = 1
    lane: Lane = "interactive"

    def job_id(self) -> str | None:
        """The job id of the entry if it is usable as a key part (even when the rest of the
        entry is malformed); else there is nobody to answer."""
        try:
            job_id = (self.fields or {})[b"job_id"].decode()
        except (KeyError, UnicodeDecodeError):
            return None
        return job_id if JOB_ID_RE.match(job_id) else None


def _backlog_member(entry: Entry) -> str | None:
    """The member the enqueue added to the backlog set for ``entry`` (None: it has none)."""
    job_id, fields = entry.job_id(), entry.fields or {}
    if job_id is None or b"cost_s" not in fields:
        return None
    try:
        cost = fields[b"cost_s"].decode()
    except UnicodeDecodeError:
        return None
    return backlog_member(entry.lane, cost, job_id)


@dataclass
class Outcome:
    """What one processed batch writes, committed in one MULTI/EXEC: results, final statuses,
    dead letters, then the acknowledgement of every entry of the batch."""

    consumer: Consumer
    pipe: Any = field(init=False)

    def __post_init__(self) -> None:
        self.pipe = self.consumer.redis.pipeline(transaction=True)

    def store(self, result: JobResult, status: JobStatus) -> None:
        keys, ttl = self.consumer.keys, self.consumer.result_ttl_s
        self.pipe.set(keys.result(result.job_id), result.encode(), ex=ttl)
        self.pipe.rpush(keys.done(result.job_id), status.state)
        self.pipe.expire(keys.done(result.job_id), ttl)
        self.pipe.set(keys.status(result.job_id), status.encode(), ex=ttl)

    def mark(self, status: JobStatus) -> None:
        """A final status without a result (a cancelled job: nobody is waiting for one)."""
        keys = self.consumer.keys
        self.pipe.set(keys.status(status.job_id), status.encode(), ex=self.consumer.result_ttl_s)

    def dead_letter(self, entry: Entry, status: int, reason: str) -> None:
        fields = dict(entry.fields or {})
        pixels = fields.get(b"pixels", b"")
        if len(pixels) > DEAD_LETTER_MAX_PIXEL_BYTES:
            fields[b"pixels"] = b""
            fields[b"pixels_dropped_bytes"] = str(len(pixels)).encode()
        fields.update(
            {
                b"dead_reason": reason.encode(),
                b"dead_status": str(status).encode(),
                b"dead_source_id": entry.entry_id.encode(),
                b"dead_lane": entry.lane.encode(),
                b"dead_deliveries": str(entry.deliveries).encode(),
                b"dead_worker": self.consumer.name.encode(),
                b"dead_at": repr(time.time()).encode(),
            }
        )
        self.pipe.xadd(
            self.consumer.keys.dead_letter, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True
        )

    def commit(self, entries: Iterable[Entry]) -> None:
        """Acknowledge and delete ``entries`` in the same transaction as everything stored,
        and take them off the backlog the API's admission reads."""
        entries = list(entries)
        by_stream: dict[str, list[str]] = {}
        for entry in entries:
            by_stream.setdefault(self.consumer.keys.lane_stream(entry.lane), []).append(
                entry.entry_id
            )
        for stream, ids in by_stream.items():
            self.pipe.xack(stream, CONSUMER_GROUP, *ids)
            self.pipe.xdel(stream, *ids)
        answered = [m for m in (_backlog_member(entry) for entry in entries) if m is not None]
        if answered:
            self.pipe.zrem(self.consumer.keys.backlog, *answered)
        self.pipe.execute()


class Consumer:
    """One worker's connection to the job streams, as consumer ``name`` of group ``workers``."""

    def __init__(
        self,
        redis_url: str,
        keys: Keys,
        name: str,
        *,
        result_ttl_s: int,
        claim_idle_ms: int,
        socket_timeout_s: float = 10.0,
    ) -> None:
        self.keys = keys
        self.name = name
        self.result_ttl_s = result_ttl_s
        self.claim_idle_ms = claim_idle_ms
        self.redis = redis.Redis.from_url(
            redis_url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=5.0,
            health_check_interval=30,
        )
        self._cursors: dict[str, str] = {stream: "0-0" for stream in keys.streams}
        self._lock = threading.Lock()
        self._in_flight: dict[str, str] = {}
        """entry id -> stream, of the entries read and not yet committed."""

    @classmethod
    def from_settings(cls, settings: Any, name: str) -> Consumer:
        return cls(
            settings.redis_url,
            settings.keys,
            name,
            result_ttl_s=settings.result_ttl_s,
            claim_idle_ms=settings.claim_idle_ms,
        )

    # ------------------------------------------------------------------------ streams

    def ensure_groups(self) -> bool:
        """Create the consumer group on both lanes (and the streams). From id 0: jobs queued
        before any worker existed are served too (processed entries are deleted, so 0 means
        "all waiting"). True if a group had to be created."""
        created = False
        for stream in self.keys.streams:
            try:
                self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
                created = True
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        return created

    def read(self, lane: Lane, count: int, block_ms: int | None) -> list[Entry]:
        """Up to ``count`` new entries of ``lane``; ``block_ms=None`` does not block."""
        response = self.redis.xreadgroup(
            CONSUMER_GROUP,
            self.name,
            {self.keys.lane_stream(lane): ">"},
            count=count,
            block=block_ms,
        )
        entries = [
            Entry(entry_id.decode(), fields or None, lane=lane)
            for _stream, messages in (response or [])
            for entry_id, fields in messages
        ]
        self._track(entries)
        return entries

    def reclaim(self, count: int) -> list[Entry]:
        """Entries idle longer than ``claim_idle_ms`` on any consumer (a dead worker's), with
        the number of times each has been delivered (this delivery included)."""
        entries: list[Entry] = []
        for lane in LANES:
            stream = self.keys.lane_stream(lane)
            response = self.redis.xautoclaim(
                stream,
                CONSUMER_GROUP,
                self.name,
                min_idle_time=self.claim_idle_ms,
                start_id=self._cursors[stream],
                count=count,
            )
            cursor, messages = response[0], response[1]
            self._cursors[stream] = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
            entries += [
                Entry(entry_id.decode(), fields or None, lane=lane) for entry_id, fields in messages
            ]
        if not entries:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry in entries:
            stream = self.keys.lane_stream(entry.lane)
            pipe.xpending_range(stream, CONSUMER_GROUP, entry.entry_id, entry.entry_id, 1)
        for entry, info in zip(entries, pipe.execute(), strict=True):
            entry.deliveries = int(info[0]["times_delivered"]) if info else 1
        self._track(entries)
        return entries

    def _track(self, entries: list[Entry]) -> None:
        with self._lock:
            for entry in entries:
                self._in_flight[entry.entry_id] = self.keys.lane_stream(entry.lane)

    def release(self, entries: Iterable[Entry]) -> None:
        """Stop refreshing ``entries`` (committed, or given up)."""
        with self._lock:
            for entry in entries:
                self._in_flight.pop(entry.entry_id, None)

    def forget_in_flight(self) -> None:
        """Stop refreshing everything read but not committed (Redis failed mid-batch), so those
        jobs become claimable after ``claim_idle_ms`` - by this worker or another."""
        with self._lock:
            self._in_flight.clear()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def refresh_claims(self) -> None:
        """Reset the idle time of this consumer's in-flight entries (heartbeat)."""
        with self._lock:
            by_stream: dict[str, set[str]] = {}
            for entry_id, stream in self._in_flight.items():
                by_stream.setdefault(stream, set()).add(entry_id)
        for stream, ids in by_stream.items():
            pending = self.redis.xpending_range(
                stream, CONSUMER_GROUP, "-", "+", count=10_000, consumername=self.name
            )
            mine = [p["message_id"] for p in pending if p["message_id"].decode() in ids]
            if mine:
                self.redis.xclaim(
                    stream, CONSUMER_GROUP, self.name, min_idle_time=0, message_ids=mine,
                    justid=True,
                )  # fmt: skip

    # ------------------------------------------------------------------------ job state

    def cancelled(self, job_ids: list[str]) -> set[str]:
        """Which of ``job_ids`` their callers have cancelled."""
        if not job_ids:
            return set()
        flags = self.redis.mget([self.keys.cancel(job_id) for job_id in job_ids])
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag is not None}

    def stored(self, job_ids: list[str]) -> set[str]:
        """Which of ``job_ids`` already have a result (stored by a worker that died before
        acknowledging)."""
        if not job_ids:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(self.keys.result(job_id))
        return {job_id for job_id, n in zip(job_ids, pipe.execute(), strict=True) if n}

    def set_status(self, statuses: Iterable[JobStatus]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for status in statuses:
            pipe.set(self.keys.status(status.job_id), status.encode(), ex=self.result_ttl_s)
        pipe.execute()

    def outcome(self) -> Outcome:
        return Outcome(self)

    # ------------------------------------------------------------------------ worker state

    def heartbeat(self, info: dict[str, Any], ttl_ms: int) -> None:
        self.redis.set(self.keys.heartbeat(self.name), json.dumps(info), px=ttl_ms)

    def remove_heartbeat(self) -> None:
        self.redis.delete(self.keys.heartbeat(self.name))

    def publish_costs(self, costs: Iterable[ModelCost]) -> None:
        """Tell the API replicas how expensive each model is on this worker. The last writer
        wins: workers of one deployment run on the same kind of device."""
        mapping = {cost.model: cost.encode() for cost in costs}
        if mapping:
            self.redis.hset(self.keys.costs, mapping=mapping)

    def claim_cost_probe(self, model: str, fingerprint: str, ttl_ms: int) -> bool:
        """Whether this worker is the one to probe ``model`` (nobody else is probing it)."""
        key = self.keys.cost_probe(model, fingerprint)
        return bool(self.redis.set(key, self.name, nx=True, px=ttl_ms))

    def release_cost_probe(self, model: str, fingerprint: str) -> None:
        """Let the claim go, if it is still this worker's (its TTL may have passed it on)."""
        self.redis.eval(
            _RELEASE_IF_OWNER_LUA, 1, self.keys.cost_probe(model, fingerprint), self.name
        )

    def read_cost(self, model: str) -> ModelCost | None:
        """The cost the deployment's workers published for ``model`` (None: none, or one this
        worker cannot read)."""
        raw = self.redis.hget(self.keys.costs, model)
        return decode_costs({model: raw}).get(model) if raw is not None else None

    def close(self) -> None:
        self.redis.close()

"""The API's side of the Redis contract (``jobqueue.protocol``): enqueue, wait, cancel, read
status and costs, and the per-client token bucket. asyncio, for the FastAPI process.

One Lua script checks the depth of both lanes, makes sure the consumer group exists and adds the
job with its status record, so backpressure is exact across API replicas and a job is never added
to a stream without a group (after a Redis restart without persistence the API may be first to
recreate the stream; the group starts at id 0 so a worker that comes back later still sees it).

Waiting is a loop of short ``BLPOP`` calls on the job's done list rather than one long one: the
socket timeout stays short, so a Redis that disappears is noticed within ``wait_chunk_s`` and the
caller gets a 503 instead of hanging; and between two calls the caller is asked whether it is
still there (``abandoned``), so a client that disconnects has its job cancelled within a chunk.

Redis errors (``redis.exceptions.RedisError``) propagate: the API maps them to 503. The
connection pool reconnects by itself, so the API recovers when Redis comes back.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobqueue.protocol import (
    CONSUMER_GROUP,
    FINAL_STATES,
    Job,
    JobResult,
    JobStatus,
    Keys,
    Lane,
    ModelCost,
    backlog_member,
    decode_costs,
    lanes_ahead,
)

# Prunes the backlog set of members past ``now`` and sums the estimates of the rest that lie
# in the comma-separated ``lanes``: {seconds, jobs}. Members that do not parse as
# ``lane|seconds|id`` with a finite estimate >= 0 count for nothing. The one place the backlog
# is summed: both the check before decoding and the enqueue's exact one run it.
_SUM_BACKLOG_LUA = """
local function sum_backlog(key, now, lanes)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. now)
  local wanted = {}
  for lane in string.gmatch(lanes, '[^,]+') do wanted[lane] = true end
  local total, jobs = 0, 0
  for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local lane, cost = string.match(member, '^([^|]+)|([^|]+)|.')
    local seconds = tonumber(cost or '')
    if lane and wanted[lane] and seconds and seconds == seconds and seconds >= 0
        and seconds < math.huge then
      total = total + seconds
      jobs = jobs + 1
    end
  end
  return total, jobs
end
"""

# ARGV: now, lanes. Returns {seconds as a string, jobs}.
_BACKLOG_LUA = (
    _SUM_BACKLOG_LUA
    + """
local total, jobs = sum_backlog(KEYS[1], ARGV[1], ARGV[2])
return {tostring(total), jobs}
"""
)

# ARGV: max depth, group, status, status TTL, deadline, backlog member, the most seconds of
# work that may be ahead of the job (negative: no limit), now, the lanes ahead of it, then the
# entry's fields. Returns {entry id, depth}, {0, depth} when full, {-1, depth, seconds ahead,
# jobs ahead} when the work ahead of the job is over the limit. The backlog is summed here, in
# the same script as the XADD, so a burst of submissions cannot all pass a check made before
# any was queued; it is pruned on every enqueue, with the limit or without.
_ENQUEUE_LUA = (
    _SUM_BACKLOG_LUA
    + """
local depth = redis.call('XLEN', KEYS[1]) + redis.call('XLEN', KEYS[2])
if depth >= tonumber(ARGV[1]) then
  return {0, depth}
end
local ahead, jobs = sum_backlog(KEYS[5], ARGV[8], ARGV[9])
local limit = tonumber(ARGV[7])
if limit >= 0 and jobs > 0 and ahead > limit then
  return {-1, depth, tostring(ahead), jobs}
end
redis.pcall('XGROUP', 'CREATE', KEYS[3], ARGV[2], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[3], '*', unpack(ARGV, 10))
redis.call('SET', KEYS[4], ARGV[3], 'EX', ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[6])
return {id, depth + 1}
"""
)

# Token bucket: ARGV = rate (tokens/s), burst, cost, ttl. Time from the Redis server, so API
# replicas with skewed clocks share one bucket correctly. Returns {allowed, tokens*1000, wait ms}.
_TOKEN_BUCKET_LUA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {allowed, math.floor(tokens * 1000), math.ceil(wait * 1000)}
"""


class QueueFullError(Exception):
    """The lanes hold ``max_queue_depth`` jobs or more; the caller should retry later."""

    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"queue is full ({depth} jobs waiting, limit {limit})")
        self.depth = depth
        self.limit = limit


class QueueBusyError(Exception):
    """More estimated work is ahead of the job in its lane than its caller may wait for."""

    def __init__(self, ahead_s: float, jobs: int) -> None:
        super().__init__(f"{jobs} job(s), about {ahead_s:.1f} s of work, ahead of this one")
        self.ahead_s = ahead_s
        self.jobs = jobs


class JobTimeoutError(Exception):
    """The caller's time ran out; the job has been cancelled so no worker computes it."""


class JobAbandonedError(Exception):
    """The caller went away while waiting; the job has been cancelled."""


class ResultMissingError(Exception):
    """The job was reported done but its result is gone (expired or evicted)."""


@dataclass(frozen=True)
class Enqueued:
    job_id: str
    entry_id: str
    depth: int


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    remaining: float
    retry_after_s: float


class JobQueue:
    """Async Redis client of one API process."""

    def __init__(
        self,
        redis_url: str,
        keys: Keys,
        *,
        max_queue_depth: int,
        result_ttl_s: int,
        redis_timeout_s: float = 5.0,
        wait_chunk_s: float = 1.0,
    ) -> None:
        self.keys = keys
        self.max_queue_depth = max_queue_depth
        self.result_ttl_s = result_ttl_s
        self.wait_chunk_s = wait_chunk_s
        self.redis = Redis.from_url(
            redis_url,
            socket_timeout=redis_timeout_s,
            socket_connect_timeout=min(2.0, redis_timeout_s),
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            health_check_interval=30,
        )
        self._enqueue = self.redis.register_script(_ENQUEUE_LUA)
        self._backlog = self.redis.register_script(_BACKLOG_LUA)
        self._token_bucket = self.redis.register_script(_TOKEN_BUCKET_LUA)
        self._costs: dict[str, ModelCost] = {}
        self._costs_read_at = -math.inf
        self._workers = 0
        self._workers_read_at = -math.inf

    @classmethod
    def from_settings(cls, settings: Any) -> JobQueue:
        """From ``ApiSettings`` (or anything with the same fields)."""
        return cls(
            settings.redis_url,
            settings.keys,
            max_queue_depth=settings.max_queue_depth,
            result_ttl_s=settings.result_ttl_s,
            redis_timeout_s=settings.redis_timeout_s,
            wait_chunk_s=settings.wait_chunk_s,
        )

    async def close(self) -> None:
        await self.redis.aclose()

    # ------------------------------------------------------------------------ submitting

    async def enqueue(
        self, job: Job, *, status_ttl_s: int, max_ahead_s: float | None = None
    ) -> Enqueued:
        """Add ``job`` to its lane unless the queue is full (``QueueFullError``) or more than
        ``max_ahead_s`` estimated seconds of work are ahead of it (``QueueBusyError``)."""
        status = JobStatus.for_job(job, "queued").encode()
        fields: list[Any] = []
        for name, value in job.to_fields().items():
            fields += [name, value]
        entry_id, depth, *rest = await self._enqueue(
            keys=[
                self.keys.stream,
                self.keys.bulk_stream,
                self.keys.lane_stream(job.lane),
                self.keys.status(job.job_id),
                self.keys.backlog,
            ],
            args=[
                self.max_queue_depth,
                CONSUMER_GROUP,
                status,
                max(1, int(status_ttl_s)),
                repr(job.deadline),
                backlog_member(job.lane, repr(job.cost_s), job.job_id),
                -1 if max_ahead_s is None else repr(max_ahead_s),
                repr(time.time()),
                ",".join(lanes_ahead(job.lane)),
                *fields,
            ],
        )
        if entry_id == 0:
            raise QueueFullError(int(depth), self.max_queue_depth)
        if entry_id == -1:
            raise QueueBusyError(float(_text(rest[0])), int(rest[1]))
        return Enqueued(job.job_id, _text(entry_id), int(depth))

    async def depth(self) -> int:
        """Jobs in both lanes, queued or in flight."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.keys.streams:
                pipe.xlen(stream)
            lengths = await pipe.execute()
        return int(sum(lengths))

    async def work_ahead(self, lane: Lane) -> tuple[float, int]:
        """(estimated seconds, jobs) not yet answered that a new job of ``lane`` would wait
        behind (members past their deadline are pruned first: such a job is never computed)."""
        total, jobs = await self._backlog(
            keys=[self.keys.backlog], args=[repr(time.time()), ",".join(lanes_ahead(lane))]
        )
        return float(_text(total)), int(jobs)

    async def ensure_room(self) -> None:
        """Raise ``QueueFullError`` when the queue is full now: a cheap check made before the
        upload is read and decoded, so a burst at a full queue costs no memory. (``enqueue``
        checks again, exactly.)"""
        depth = await self.depth()
        if depth >= self.max_queue_depth:
            raise QueueFullError(depth, self.max_queue_depth)

    async def take_token(
        self, client: str, *, rate_per_s: float, burst: int, cost: float = 1.0
    ) -> RateDecision:
        """One request of ``client`` against its token bucket (``burst`` tokens, refilled at
        ``rate_per_s``)."""
        ttl = max(60, math.ceil(burst / rate_per_s) * 2)
        allowed, tokens_milli, wait_ms = await self._token_bucket(
            keys=[self.keys.quota(client)], args=[rate_per_s, burst, cost, ttl]
        )
        return RateDecision(bool(allowed), int(tokens_milli) / 1000, int(wait_ms) / 1000)

    # ------------------------------------------------------------------------ waiting

    async def wait(
        self,
        job_id: str,
        deadline: float,
        abandoned: Callable[[], Awaitable[bool]] | None = None,
    ) -> JobResult:
        """Block until the job's result is stored, or cancel it at ``deadline`` (epoch s,
        ``JobTimeoutError``) or when ``abandoned()`` says the caller has gone
        (``JobAbandonedError``). The result is removed once read: only this caller waits for a
        synchronous job."""
        done_key = self.keys.done(job_id)
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                await self.cancel(job_id)
                # The worker may have finished between the last BLPOP and the cancel marker.
                late = await self.fetch(job_id)
                if late is None:
                    raise JobTimeoutError(job_id)
                await self.discard(job_id)
                return late
            if abandoned is not None and await abandoned():
                await self.cancel(job_id)
                await self.discard(job_id)
                raise JobAbandonedError(job_id)
            chunk = max(0.01, min(remaining, self.wait_chunk_s))
            if await self.redis.blpop([done_key], timeout=chunk) is not None:
                break
        result = await self.fetch(job_id)
        if result is None:
            raise ResultMissingError(job_id)
        await self.discard(job_id)
        return result

    async def fetch(self, job_id: str) -> JobResult | None:
        blob = await self.redis.get(self.keys.result(job_id))
        return None if blob is None else JobResult.decode(blob)

    async def status(self, job_id: str) -> JobStatus | None:
        raw = await self.redis.get(self.keys.status(job_id))
        return None if raw is None else JobStatus.decode(raw)

    async def cancel(self, job_id: str, *, keep_status: JobStatus | None = None) -> None:
        """Mark the job cancelled: a worker skips it, or stops it between forward passes.
        ``keep_status``: record the cancellation (``DELETE /jobs/{id}``) instead of removing
        the status."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.cancel(job_id), b"1", ex=self.result_ttl_s)
            if keep_status is None:
                pipe.unlink(self.keys.status(job_id))
            else:
                pipe.set(self.keys.status(job_id), keep_status.encode(), ex=self.result_ttl_s)
                pipe.unlink(self.keys.result(job_id), self.keys.done(job_id))
            await pipe.execute()

    async def discard(self, job_id: str) -> None:
        await self.redis.unlink(
            self.keys.result(job_id), self.keys.status(job_id), self.keys.done(job_id)
        )

    async def first_report(self, job_id: str) -> bool:
        """True exactly once per job across API replicas: whether this caller should count
        the job's final answer in its metrics."""
        return bool(
            await self.redis.set(self.keys.reported(job_id), b"1", nx=True, ex=self.result_ttl_s)
        )

    # ------------------------------------------------------------------------ workers

    async def costs(self, max_age_s: float = 2.0) -> dict[str, ModelCost]:
        """The workers' measured cost of each model (cached for ``max_age_s``)."""
        now = time.monotonic()
        if now - self._costs_read_at >= max_age_s:
            self._costs = decode_costs(await self.redis.hgetall(self.keys.costs))
            self._costs_read_at = now
        return self._costs

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def live_workers(self, max_age_s: float = 0.0) -> int:
        """Workers whose heartbeat key exists; a worker's key expires (TTL) when it dies.
        ``max_age_s``: a count at most that old will do (a SCAN walks the whole keyspace, too
        much for every submission)."""
        now = time.monotonic()
        if now - self._workers_read_at >= max_age_s:
            count = 0
            async for _ in self.redis.scan_iter(match=self.keys.heartbeat_pattern, count=1000):
                count += 1
            self._workers, self._workers_read_at = count, now
        return self._workers

    async def readiness(self) -> tuple[int, int]:
        """(live workers, those of them still measuring their models' costs) in one SCAN: a
        worker serves while it measures (each job waits for at most one probe) and admission
        assumes a cost until then. Refreshes the ``live_workers`` count as well."""
        keys = [
            k async for k in self.redis.scan_iter(match=self.keys.heartbeat_pattern, count=1000)
        ]
        beats = [raw for raw in (await self.redis.mget(keys) if keys else []) if raw is not None]
        measuring = 0
        for raw in beats:
            with contextlib.suppress(ValueError, AttributeError):
                measuring += bool(json.loads(raw).get("measuring"))
        self._workers, self._workers_read_at = len(beats), time.monotonic()
        return len(beats), measuring


def is_final(status: JobStatus | None) -> bool:
    return status is not None and status.state in FINAL_STATES


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

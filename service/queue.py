"""The API's side of the Redis job queue (wire format: ``jobqueue.protocol``).

One Lua script checks the queue depth, makes sure the consumer group exists and adds the job, so
backpressure is exact across API replicas and a job is never added to a stream without a group
(after a Redis restart without persistence the API may be first to recreate the stream; the group
starts at id 0 so a worker that comes back later still sees the job).

Waiting is a loop of short ``BLPOP`` calls on the job's done list rather than one long one: the
socket timeout stays short, so a Redis that disappears is noticed within ``wait_chunk_s`` and
the caller gets a 503 instead of hanging until its own timeout.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobqueue.protocol import CONSUMER_GROUP, Job, JobResult
from service.settings import ApiSettings

_ENQUEUE_LUA = """
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then
  return {0, depth}
end
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[2], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5))
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
return {id, depth + 1}
"""


class QueueFullError(Exception):
    """The stream holds ``max_queue_depth`` jobs or more; the caller should retry later."""

    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"queue is full ({depth} jobs waiting, limit {limit})")
        self.depth = depth
        self.limit = limit


class JobTimeoutError(Exception):
    """The caller's time ran out; the job has been cancelled so no worker computes it."""


class ResultMissingError(Exception):
    """The job was reported done but its result is gone (expired or evicted)."""


@dataclass(frozen=True)
class Enqueued:
    job_id: str
    entry_id: str
    depth: int


class JobQueue:
    """Async Redis client for enqueueing jobs, waiting for results and readiness checks.

    Redis errors (``redis.exceptions.RedisError``) propagate: the app maps them to 503. The
    connection pool reconnects by itself, so the API recovers when Redis comes back.
    """

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=min(2.0, settings.redis_timeout_s),
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            health_check_interval=30,
        )
        self._enqueue = self.redis.register_script(_ENQUEUE_LUA)

    async def close(self) -> None:
        await self.redis.aclose()

    async def enqueue(self, job: Job, *, status_ttl_s: int) -> Enqueued:
        """Add ``job`` unless the queue is full (``QueueFullError``)."""
        status = json.dumps(
            {
                "state": "queued",
                "op": job.op,
                "model": job.model,
                "deadline": job.deadline,
                "enqueued_at": job.enqueued_at,
            }
        )
        fields: list[Any] = []
        for name, value in job.to_fields().items():
            fields += [name, value]
        entry_id, depth = await self._enqueue(
            keys=[self.keys.stream, self.keys.status(job.job_id)],
            args=[
                self.settings.max_queue_depth,
                CONSUMER_GROUP,
                status,
                max(1, int(status_ttl_s)),
                *fields,
            ],
        )
        if entry_id == 0:
            raise QueueFullError(int(depth), self.settings.max_queue_depth)
        return Enqueued(job.job_id, _text(entry_id), int(depth))

    async def wait(self, job_id: str, deadline: float) -> JobResult:
        """Block until the job's result is stored, or cancel it at ``deadline`` (epoch s).

        The result is removed once read: only this caller waits for a synchronous job.
        """
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
            chunk = max(0.01, min(remaining, self.settings.wait_chunk_s))
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

    async def status(self, job_id: str) -> dict[str, Any] | None:
        """The job's status record: the API writes JSON; a bare state string is accepted too."""
        raw = await self.redis.get(self.keys.status(job_id))
        if raw is None:
            return None
        try:
            parsed = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if isinstance(parsed, dict):
            return parsed
        return {"state": _text(raw)}

    async def cancel(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.cancel(job_id), b"1", ex=self.settings.result_ttl_s)
            pipe.unlink(self.keys.status(job_id))
            await pipe.execute()

    async def discard(self, job_id: str) -> None:
        await self.redis.unlink(
            self.keys.result(job_id), self.keys.status(job_id), self.keys.done(job_id)
        )

    async def depth(self) -> int:
        return int(await self.redis.xlen(self.keys.stream))

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def live_workers(self) -> int:
        """Workers whose heartbeat key exists; a worker's key expires (TTL) when it dies."""
        count = 0
        async for _ in self.redis.scan_iter(match=self.keys.heartbeat_pattern, count=1000):
            count += 1
        return count


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

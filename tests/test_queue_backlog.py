"""The backlog the API's admission reads (``jobqueue``): what the enqueue adds, the worker's
acknowledgement removes and a passed deadline drops, against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest

from jobqueue.client import JobQueue, QueueBusyError
from jobqueue.consumer import Consumer, Outcome
from jobqueue.protocol import Job, Keys, backlog_member

KEYS = Keys("backlog-test")


def job(cost_s: float, lane: str = "interactive", deadline_in_s: float = 60.0) -> Job:
    return Job(model="mosaic", op="stylize", width=1, height=1, channels=3, pixels=b"\0\0\0",
               cost_s=cost_s, lane=lane, deadline=time.time() + deadline_in_s)  # fmt: skip


def test_the_backlog_is_what_is_queued_until_a_worker_answers_it(redis_server: str) -> None:
    async def go() -> None:
        queue = JobQueue(redis_server, KEYS, max_queue_depth=64, result_ttl_s=60)
        consumer = Consumer(redis_server, KEYS, "w1", result_ttl_s=60, claim_idle_ms=60_000)
        try:
            for cost, lane in ((0.25, "interactive"), (1.5, "interactive"), (7.0, "bulk")):
                await queue.enqueue(job(cost, lane), status_ttl_s=60)
            await queue.enqueue(job(100.0, "bulk", deadline_in_s=0.2), status_ttl_s=60)
            assert await queue.work_ahead("interactive") == (1.75, 2)
            assert await queue.work_ahead("bulk") == (108.75, 4)

            time.sleep(0.3)  # the 100 s job's deadline passes: it will never be computed
            assert await queue.work_ahead("bulk") == (8.75, 3)

            # A worker takes one job of each lane and acknowledges them: they leave the backlog
            # in the same transaction, running jobs (read, not yet answered) stay in it.
            consumer.ensure_groups()
            taken = consumer.read("interactive", 1, None) + consumer.read("bulk", 1, None)
            assert len(taken) == 2
            assert await queue.work_ahead("bulk") == (8.75, 3)
            Outcome(consumer).commit(iter(taken))  # any iterable, a generator too
            assert await queue.work_ahead("interactive") == (1.5, 1)
            assert await queue.work_ahead("bulk") == (1.5, 1)
        finally:
            await queue.close()
            consumer.close()

    asyncio.run(go())


def test_the_enqueue_refuses_exactly_the_jobs_past_the_limit_even_in_a_burst(
    redis_server: str,
) -> None:
    """Six 1 s bulk jobs submitted at once, each allowed 2.5 s of work ahead of it: exactly
    three are queued, whatever the order (the sum is taken in the enqueue's own script);
    an interactive job does not queue behind bulk ones, a bulk job behind both lanes."""

    async def go() -> None:
        queue = JobQueue(redis_server, KEYS, max_queue_depth=64, result_ttl_s=60)
        try:
            # Members no enqueue writes (a bad estimate, another format) count for nothing.
            later = time.time() + 60
            bogus = {"bulk|nan|a": later, "bulk|inf|b": later, "bulk|-1|c": later, "junk": later}
            await queue.redis.zadd(KEYS.backlog, bogus)
            outcomes = await asyncio.gather(
                *(queue.enqueue(job(1.0, "bulk"), status_ttl_s=60, max_ahead_s=2.5)
                  for _ in range(6)),
                return_exceptions=True,
            )  # fmt: skip
            refused = [o for o in outcomes if isinstance(o, QueueBusyError)]
            assert len(refused) == 3 and len(outcomes) - len(refused) == 3, outcomes
            assert all(r.jobs == 3 and r.ahead_s == 3.0 for r in refused)
            assert await queue.depth() == 3
            # 3 s of bulk work is not ahead of an interactive job...
            await queue.enqueue(job(0.5), status_ttl_s=60, max_ahead_s=0.1)
            # ...but 3.5 s of both lanes is ahead of a bulk one; no limit, no refusal.
            with pytest.raises(QueueBusyError) as caught:
                await queue.enqueue(job(1.0, "bulk"), status_ttl_s=60, max_ahead_s=3.4)
            assert (caught.value.ahead_s, caught.value.jobs) == (3.5, 4)
            await queue.enqueue(job(1.0, "bulk"), status_ttl_s=60)
            assert await queue.depth() == 5
            # Every enqueue prunes what is past its deadline, so the set cannot grow without
            # bound where nothing reads it (ADMIT_BY_QUEUE_WAIT=false).
            await queue.redis.zadd(KEYS.backlog, {"bulk|1.0|old": time.time() - 1})
            await queue.enqueue(job(1.0, "bulk"), status_ttl_s=60)
            assert await queue.redis.zscore(KEYS.backlog, "bulk|1.0|old") is None
        finally:
            await queue.close()

    asyncio.run(go())


@pytest.mark.parametrize(
    "member", ["interactive|nan|x", "bulk|-1.0|x", "nowhere|1.0|x", "bulk|1.0|", "garbage"]
)
def test_a_member_that_does_not_parse_counts_for_nothing(redis_server: str, member: str) -> None:
    async def go() -> None:
        queue = JobQueue(redis_server, KEYS, max_queue_depth=64, result_ttl_s=60)
        try:
            later = time.time() + 60
            await queue.redis.zadd(KEYS.backlog, {member: later})
            assert await queue.work_ahead("bulk") == (0.0, 0)
            await queue.redis.zadd(KEYS.backlog, {backlog_member("bulk", repr(0.1), "a"): later})
            assert await queue.work_ahead("bulk") == (0.1, 1)
        finally:
            await queue.close()

    asyncio.run(go())

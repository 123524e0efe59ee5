"""The backlog the API's admission reads (``jobqueue``): what the enqueue adds, the worker's
acknowledgement removes and a passed deadline drops, against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest

from jobqueue.client import JobQueue
from jobqueue.consumer import Consumer, Outcome
from jobqueue.protocol import Job, Keys, backlog_member, parse_backlog_member

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
            backlog = await queue.backlog()
            assert backlog.ahead_of("interactive") == (1.75, 2)
            assert backlog.ahead_of("bulk") == (108.75, 4)

            time.sleep(0.3)  # the 100 s job's deadline passes: it will never be computed
            assert (await queue.backlog()).ahead_of("bulk") == (8.75, 3)

            # A worker takes one job of each lane and acknowledges them: they leave the backlog
            # in the same transaction, running jobs (read, not yet answered) stay in it.
            consumer.ensure_groups()
            taken = consumer.read("interactive", 1, None) + consumer.read("bulk", 1, None)
            assert len(taken) == 2
            assert (await queue.backlog()).ahead_of("bulk") == (8.75, 3)
            Outcome(consumer).commit(iter(taken))  # any iterable, a generator too
            backlog = await queue.backlog()
            assert backlog.ahead_of("interactive") == (1.5, 1)
            assert backlog.ahead_of("bulk") == (1.5, 1)
        finally:
            await queue.close()
            consumer.close()

    asyncio.run(go())


@pytest.mark.parametrize(
    "member", ["interactive|nan|x", "bulk|-1.0|x", "nowhere|1.0|x", "bulk|1.0|", "garbage"]
)
def test_a_member_that_does_not_parse_counts_for_nothing(member: str) -> None:
    assert parse_backlog_member(member) is None
    assert parse_backlog_member(backlog_member("bulk", repr(0.1), "abc")) == ("bulk", 0.1)

"""The capacity model behind the README's table: Erlang C against closed forms, the p99 it
predicts against a simulation of the same queue, and the worker counts it recommends."""

from __future__ import annotations

import heapq
import json
import math
import random
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main
from bench.capacity import (
    erlang_c,
    p99_latency,
    seconds_per_image_from_report,
    workers_needed,
)


def test_erlang_c_matches_closed_forms() -> None:
    # one server: a job waits with probability rho
    assert erlang_c(1, 0.3) == pytest.approx(0.3)
    # two servers at rho = 0.5 (a = 1 Erlang): 1/3
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    # textbook value: c = 3, a = 2 -> 4/9
    assert erlang_c(3, 2.0) == pytest.approx(4 / 9)
    # large c stays finite and in [0, 1] (the recursion avoids factorials)
    assert 0.0 < erlang_c(500, 480.0) < 1.0
    with pytest.raises(ValueError):
        erlang_c(2, 2.0)  # overloaded


def simulated_p99(rate: float, seconds: float, workers: int, jobs: int = 400_000) -> float:
    """M/M/c by simulation: Poisson arrivals, exponential service, first come first served."""
    rng = random.Random(1)
    free_at = [0.0] * workers
    t = 0.0
    latencies = []
    for _ in range(jobs):
        t += rng.expovariate(rate)
        start = max(t, heapq.heappop(free_at))
        service = rng.expovariate(1 / seconds)
        heapq.heappush(free_at, start + service)
        latencies.append(start - t)
    waits = sorted(latencies[jobs // 10 :])  # past the warm-up
    return waits[int(0.99 * len(waits))]


@pytest.mark.parametrize(("rate", "workers"), [(8.0, 1), (25.0, 3), (50.0, 5)])
def test_p99_wait_matches_a_simulated_queue(rate: float, workers: int) -> None:
    seconds = 0.079
    predicted_wait = p99_latency(rate, seconds, workers) - seconds
    assert simulated_p99(rate, seconds, workers) == pytest.approx(predicted_wait, rel=0.1)


def test_recommendation_meets_both_rules() -> None:
    plan = workers_needed(100, 0.079, 1.0)
    assert plan.by_utilisation == math.ceil(100 * 0.079 / 0.7) == 12
    assert plan.workers == max(plan.by_utilisation, plan.for_p99)
    assert plan.p99_s <= 1.0
    # one worker fewer than the p99 rule asks for misses the target
    assert p99_latency(100, 0.079, plan.for_p99 - 1) > 1.0
    # a tight target at a low rate is a queueing problem, not a utilisation one
    tight = workers_needed(1, 0.079, 0.25)
    assert tight.by_utilisation == 1 and tight.for_p99 == 2
    assert p99_latency(1, 0.079, 1) > 0.25 >= tight.p99_s
    assert p99_latency(20, 0.079, 1) == math.inf  # 1.58 Erlangs on one worker
    with pytest.raises(ValueError):
        workers_needed(10, 0.5, 0.4)  # a target shorter than one image


def test_cli_reads_a_worker_report(tmp_path: Path) -> None:
    report = tmp_path / "worker.json"
    report.write_text(json.dumps({"results": {
        "max_batch=8 workers=1": [{"images_per_s": 10.0}, {"images_per_s": 12.5}],
        "max_batch=8 workers=2": [{"images_per_s": 16.0}],
    }}))  # fmt: skip
    assert seconds_per_image_from_report(report) == pytest.approx(0.08)
    rc = bench_main(
        ["capacity", "--from-worker-report", str(report), "--rates", "10,100",
         "--p99-target", "1", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    plans = json.loads((tmp_path / "capacity.json").read_text())["plans"]
    assert [p["workers"] for p in plans] == [
        workers_needed(r, 0.08, 1.0).workers for r in (10, 100)
    ]
    assert "| 100 | 0.080 | 1.00 |" in (tmp_path / "capacity.md").read_text()

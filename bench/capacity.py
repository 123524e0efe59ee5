"""``python -m bench capacity``: how many workers serve a rate of images at a p99 target.

Two numbers per rate (README, "Kubernetes" / "Capacity model"):

* **by utilisation**: ``ceil(rate x seconds_per_image / utilisation)``, the workers that keep
  each one busy at most ``utilisation`` of the time (headroom for bursts and for the minute a
  new worker needs before it serves);
* **for the p99**: the fewest workers whose queueing keeps the p99 latency under the target,
  from the M/M/c (Erlang C) waiting-time tail: a job waits longer than ``t`` with probability
  ``C(c, a) exp(-(c mu - lambda) t)``, so the p99 is about
  ``seconds_per_image + max(0, ln(100 C) / (c mu - lambda))``. The service time of one image
  size is nearly constant (its p99/p50 was 1.1-1.5 in the runs behind the README), and
  exponential service overstates the waits of nearly constant ones (M/D/c waits are about half
  of M/M/c's), so this errs on the side of more workers.

The recommendation is the larger of the two. ``seconds_per_image`` is one worker's time per
image at saturation (1 / its images/s from ``python -m bench worker``), which already includes
its encode and Redis round trips; ``--from-worker-report`` reads it from such a report.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.report import markdown_table, write_report

MAX_WORKERS = 10_000


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that a job has to wait in M/M/c with ``servers`` and ``offered_load`` =
    arrival rate x service time (in Erlangs, < servers). Erlang B by its stable recursion,
    then C = c B / (c - a (1 - B))."""
    if servers < 1:
        raise ValueError("servers must be >= 1")
    if not 0 <= offered_load < servers:
        raise ValueError(f"offered load {offered_load} is not below {servers} servers")
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = offered_load * blocking / (k + offered_load * blocking)
    return servers * blocking / (servers - offered_load * (1 - blocking))


def p99_latency(rate: float, seconds_per_image: float, workers: int) -> float:
    """The M/M/c p99 of queue wait plus one service time; ``inf`` when overloaded."""
    offered = rate * seconds_per_image
    if offered >= workers:
        return math.inf
    wait_probability = erlang_c(workers, offered)
    drain = workers / seconds_per_image - rate  # c mu - lambda, jobs/s
    wait_p99 = max(0.0, math.log(100 * wait_probability) / drain) if wait_probability > 0 else 0.0
    return seconds_per_image + wait_p99


@dataclass(frozen=True)
class Plan:
    rate: float
    seconds_per_image: float
    p99_target_s: float
    utilisation: float
    by_utilisation: int
    for_p99: int
    workers: int
    """The recommendation: the larger of the two."""
    p99_s: float
    """Predicted p99 with ``workers``."""


def workers_needed(
    rate: float, seconds_per_image: float, p99_target_s: float, utilisation: float = 0.7
) -> Plan:
    if rate <= 0 or seconds_per_image <= 0 or not 0 < utilisation <= 1:
        raise ValueError("rate and seconds_per_image must be > 0, utilisation in (0, 1]")
    if p99_target_s <= seconds_per_image:
        raise ValueError(
            f"a p99 target of {p99_target_s} s is below one image's {seconds_per_image} s"
        )
    by_utilisation = max(1, math.ceil(rate * seconds_per_image / utilisation - 1e-9))
    for_p99 = max(1, math.floor(rate * seconds_per_image) + 1)  # the first stable count
    while p99_latency(rate, seconds_per_image, for_p99) > p99_target_s:
        for_p99 += 1
        if for_p99 > MAX_WORKERS:
            raise ValueError("no worker count up to 10000 meets the target")
    workers = max(by_utilisation, for_p99)
    return Plan(
        rate=rate,
        seconds_per_image=seconds_per_image,
        p99_target_s=p99_target_s,
        utilisation=utilisation,
        by_utilisation=by_utilisation,
        for_p99=for_p99,
        workers=workers,
        p99_s=p99_latency(rate, seconds_per_image, workers),
    )


def seconds_per_image_from_report(path: Path) -> float:
    """1 / the best images/s of one worker in a ``python -m bench worker`` report (its
    single-worker configuration when the report has several worker counts)."""
    data = json.loads(path.read_text())
    results: dict[str, list[dict[str, Any]]] = data["results"]
    single = [name for name in results if "workers=" not in name or "workers=1" in name.split()]
    if not single:
        raise ValueError(f"{path}: no single-worker configuration")
    best = max(level["images_per_s"] for level in results[single[0]])
    return 1.0 / best


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--seconds-per-image", type=float, help="one worker's seconds per image at saturation"
    )
    source.add_argument(
        "--from-worker-report",
        type=Path,
        help="a `python -m bench worker` JSON report: seconds per image = 1 / its best img/s",
    )
    parser.add_argument("--p99-target", type=float, default=1.0, help="seconds (default 1)")
    parser.add_argument("--rates", default="1,5,10,25,50,100", help="images/s, comma-separated")
    parser.add_argument(
        "--utilisation", type=float, default=0.7, help="busy fraction per worker (default 0.7)"
    )
    parser.add_argument("--name", default="capacity", help="file stem of the report files")


def capacity_markdown(plans: list[Plan]) -> str:
    headers = [
        "images/s", "s per image", "p99 target s", "by utilisation", "for the p99",
        "workers", "predicted p99 s",
    ]  # fmt: skip
    rows = [
        [p.rate, p.seconds_per_image, p.p99_target_s, p.by_utilisation, p.for_p99, p.workers,
         p.p99_s]
        for p in plans
    ]  # fmt: skip
    return markdown_table(headers, rows, [0, 3, 2, 0, 0, 0, 3])


def main(args: argparse.Namespace) -> dict[str, Any]:
    seconds = (
        seconds_per_image_from_report(args.from_worker_report)
        if args.from_worker_report
        else args.seconds_per_image
    )
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    plans = [workers_needed(r, seconds, args.p99_target, args.utilisation) for r in rates]
    result = {"plans": [asdict(p) for p in plans]}
    table = capacity_markdown(plans)
    write_report(Path(args.out), args.name, "capacity", "Capacity model", result, table)
    return result

"""``python -m bench startup``: how soon a starting worker serves a job queued before it.

A worker used to measure every model's cost before it read a job; now it serves once its
models are loaded and measures one cost after each batch (``worker.main``). This starts a
private redis-server, queues one job through the API's own queue client, starts one
``python -m worker`` on the zoo, and reports three moments after the process start: its first
heartbeat (what ``/readyz`` counts), the job's result, and the heartbeat that lists no model
still ``measuring``. Several ``--runs`` repeat it (each with a fresh Redis, so no published
cost is adopted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.images import synthetic_array
from bench.report import markdown_table, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo", default=None, help="zoo folder (default: the package zoo)")
    parser.add_argument("--tiny", action="store_true", help="tiny untrained nets (smoke tests)")
    parser.add_argument("--model", default="x4", help="the queued job's model (an SR net)")
    parser.add_argument("--size", type=int, default=64, help="the queued job's input side")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="KEY=VALUE", help="extra worker env"
    )
    parser.add_argument("--name", default="startup", help="file stem of the report files")


async def _enqueue(redis_url: str, prefix: str, model: str, size: int, timeout_s: float) -> str:
    from jobqueue.protocol import Job
    from service.queue import JobQueue
    from service.settings import ApiSettings

    pixels = synthetic_array(size, size, seed=7)
    job = Job(
        model=model, op="upscale", width=size, height=size, channels=3,
        pixels=pixels.tobytes(), deadline=time.time() + timeout_s,
    )  # fmt: skip
    queue = JobQueue(ApiSettings(redis_url=redis_url, queue_prefix=prefix))
    try:
        await queue.enqueue(job, status_ttl_s=int(timeout_s) + 60)
    finally:
        await queue.close()
    return job.job_id


def one_run(zoo: Path, workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Seconds from the worker's start to its heartbeat, the job's result, and no model left
    to measure."""
    import redis

    from bench.stack import Stack, StackError
    from jobqueue.protocol import JobResult, Keys

    extra = dict(kv.split("=", 1) for kv in args.worker_env)
    workdir.mkdir(parents=True, exist_ok=True)
    with Stack(zoo_dir=zoo, workdir=workdir) as stack:
        stack.start_redis()
        job_id = asyncio.run(
            _enqueue(stack.redis_url, stack.prefix, args.model, args.size, args.timeout)
        )
        client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
        keys = Keys(stack.prefix)
        moments: dict[str, float] = {}
        started = time.monotonic()
        stack.start_workers({"HEARTBEAT_INTERVAL_S": "0.2", **extra})
        try:
            while "measured_s" not in moments:
                now = time.monotonic() - started
                if now > args.timeout:
                    raise StackError(f"not done in {args.timeout:g} s: {moments}")
                if not stack.workers[0].alive:
                    raise StackError(f"the worker exited:\n{stack.log_tail('worker1')}")
                beats = [client.get(k) for k in client.scan_iter(match=keys.heartbeat_pattern)]
                live = [json.loads(b) for b in beats if b]
                if live:
                    moments.setdefault("heartbeat_s", now)
                if "answered_s" not in moments:
                    blob = client.get(keys.result(job_id))
                    if blob is not None:
                        result = JobResult.decode(blob)
                        if not result.ok:
                            raise StackError(f"the job failed: {result.error}")
                        moments["answered_s"] = now
                if "answered_s" in moments and live and not live[0].get("measuring", []):
                    moments["measured_s"] = now
                time.sleep(0.05)
        finally:
            client.close()
    return moments


def run_startup_bench(args: argparse.Namespace) -> dict[str, Any]:
    from bench.stack import make_bench_zoo

    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    zoo, zoo_note = make_bench_zoo(tmp / "zoo", tiny=args.tiny, source=args.zoo)
    runs = []
    for i in range(args.runs):
        moments = one_run(zoo, tmp / f"run{i}", args)
        runs.append(moments)
        print(
            "[startup] run {}: heartbeat {heartbeat_s:.1f} s, job answered {answered_s:.1f} s, "
            "costs measured {measured_s:.1f} s".format(i + 1, **moments),
            flush=True,
        )
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"zoo": zoo_note, "model": args.model, "size": args.size, "runs": runs, "median": median}


def startup_markdown(result: dict[str, Any]) -> str:
    rows = [
        [i + 1, r["heartbeat_s"], r["answered_s"], r["measured_s"]]
        for i, r in enumerate(result["runs"])
    ]
    text = markdown_table(
        ["run", "heartbeat s", "queued job answered s", "all costs measured s"], rows, [0, 1, 1, 1]
    )
    return text + (
        f"\nOne `{result['model']}` job of {result['size']} px queued before the worker started; "
        f"models: {result['zoo']}.\n"
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = run_startup_bench(args)
    title = "Worker start-up"
    write_report(Path(args.out), args.name, "startup", title, result, startup_markdown(result))
    return result

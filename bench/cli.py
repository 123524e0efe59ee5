"""Command-line options shared by the benchmarks that start their own stack."""

from __future__ import annotations

import argparse


def add_redis_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--redis-config KEY=VALUE`` for every benchmark that starts its own redis-server."""
    parser.add_argument(
        "--redis-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CONFIG SET on the private redis-server after start (e.g. hz=100)",
    )

"""``python -m bench tiles``: seconds per megapixel of large images, whole vs tiled, per runtime.

An image above the tile size runs as tiles that borrow the whole image's instance-norm
statistics (``worker.tiling``). On a CPU the worker runs whole style images in OpenVINO and,
since session 8, their tiles too (a frozen-statistics export, ``worker.openvino_runtime``);
the PyTorch column is the path tiles took before (and still take with ``CPU_RUNTIME=torch``).
Each figure is ``worker.costs.probe``: the engine as the worker runs it, after a warm-up pass,
on one square photo at the output side given; all in one run, so the ratios hold on a busy
machine whose absolute numbers do not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.report import markdown_table, write_report

DEFAULT_SIDES = (1536, 2048)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["multistyle"], help="zoo model names")
    parser.add_argument("--zoo", default=None, help="zoo folder (default: $MODEL_ZOO_DIR or ours)")
    parser.add_argument("--sides", type=int, nargs="+", default=list(DEFAULT_SIDES))
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenVINO threads (0: all)")
    parser.add_argument("--tile-size", type=int, default=1024, help="TILE_SIZE (output px)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(previous)


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from worker.costs import probe
    from worker.engine import Engine

    engines = {
        runtime: Engine(
            zoo_dir=args.zoo,
            cpu_runtime=runtime,
            whole_max_pixels="auto",
            tile_size=args.tile_size,
        )
        for runtime in ("auto", "torch")
    }
    rows = []
    for name in args.models:
        served, torch_only = (engines[r].model(name) for r in ("auto", "torch"))
        for side in args.sides:
            whole_s, pixels = probe(engines["auto"], name, side)
            tiled_s, _ = probe(engines["auto"], name, side, tiled=True)
            torch_s, _ = probe(engines["torch"], name, side, tiled=True)
            per_mp = {k: v / pixels * 1e6 for k, v in [("whole", whole_s), ("tiled", tiled_s)]}
            rows.append(
                {
                    "model": name,
                    "side": side,
                    "runtime": served.runtime,
                    "precision": served.precision,
                    "torch_precision": torch_only.precision,
                    "whole_s_per_mp": per_mp["whole"],
                    "tiled_s_per_mp": per_mp["tiled"],
                    "torch_tiled_s_per_mp": torch_s / pixels * 1e6,
                    "tiled_speedup": torch_s / tiled_s,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    threads = torch.get_num_threads()
    return {
        "threads": threads,
        "tile_size": args.tile_size,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    table = markdown_table(
        [
            "model",
            "side px",
            "runtime (precision)",
            "whole s/MP",
            "tiles s/MP",
            "PyTorch tiles s/MP (precision)",
            "tiles: PyTorch / served",
        ],
        [
            [
                r["model"],
                r["side"],
                f"{r['runtime']} ({r['precision']})",
                f"{r['whole_s_per_mp']:.2f}",
                f"{r['tiled_s_per_mp']:.2f}",
                f"{r['torch_tiled_s_per_mp']:.2f} ({r['torch_precision']})",
                f"{r['tiled_speedup']:.2f}x",
            ]
            for r in result["rows"]
        ],
    )
    return f"threads: {result['threads']}, TILE_SIZE {result['tile_size']}\n\n{table}\n"


def main(args: argparse.Namespace) -> None:
    result = run(args)
    write_report(Path(args.out), "tiles", "tiles", "Whole vs tiled", result, markdown(result))

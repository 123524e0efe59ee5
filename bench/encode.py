"""``python -m bench encode``: what PNG encoding costs per output size, against the forward pass.

Encoding runs on the worker's CPU after every forward pass, so at small sizes (or on a GPU) it
can rival the net itself. This times ``worker.encoding.encode`` - the worker's own code - at the
configured ``PNG_COMPRESS_LEVEL`` and at the other zlib levels, and reports the output bytes too
(the bandwidth side of the trade-off). The image is the benchmarks' photo-like synthetic
picture; a stylised photo compresses about like it (neither is flat nor pure noise).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from bench.images import synthetic_array
from bench.report import markdown_table, plot_bars, write_report
from bench.stats import ratio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="256,512,1024", help="output sizes in px (square)")
    parser.add_argument("--levels", default="0,1,3,6,9", help="PNG zlib levels to time")
    parser.add_argument("--formats", default="png,jpeg,webp", help="formats (others at defaults)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median kept)")
    parser.add_argument(
        "--no-forward", action="store_true", help="skip timing the forward pass to compare with"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny style net for the comparison")
    parser.add_argument("--quick", action="store_true", help="256,512 px; levels 0,1,6; 3 reps")
    parser.add_argument(
        "--pool-threads",
        default="",
        help="also time a batch of PNGs (level as configured) on encode pools of these sizes, "
        "as the worker's ENCODE_THREADS does (e.g. 1,2,8); ratios against the first",
    )
    parser.add_argument("--pool-batch", type=int, default=16, help="images per pooled batch")
    parser.add_argument("--name", default="encode", help="file stem of the report files")


def configured_level() -> int:
    """The worker's ``PNG_COMPRESS_LEVEL`` as its settings read it (environment / .env)."""
    from worker.settings import WorkerSettings

    return int(WorkerSettings().png_compress_level)


def time_encode(pixels: Any, fmt: str, level: int, reps: int) -> tuple[float, int]:
    """(median ms, bytes) of the worker's encoder on ``pixels``."""
    from worker.encoding import EncodeOptions, encode

    options = EncodeOptions(png_compress_level=level)
    data, _ = encode(pixels, fmt, options)  # warm-up (allocations, codec init)
    times = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        encode(pixels, fmt, options)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0, len(data)


def time_pool(pixels: Any, level: int, batch: int, threads: int, reps: int) -> float:
    """Median ms per image of encoding ``batch`` copies of ``pixels`` as PNG on a pool of
    ``threads`` (the worker's encode pool: zlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.encoding import EncodeOptions, encode

    options = EncodeOptions(png_compress_level=level)
    images = [pixels.copy() for _ in range(batch)]
    times = []
    with ThreadPoolExecutor(max_workers=threads) as pool:

        def encode_all() -> None:
            list(pool.map(lambda image: encode(image, "png", options), images))

        encode_all()  # warm-up
        for _ in range(max(1, reps)):
            start = time.perf_counter()
            encode_all()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0 / batch


def forward_ms(sizes: list[int], reps: int, tiny: bool) -> tuple[dict[int, float], str]:
    """Style net, batch 1, per output size: the worker's fast path (fp32 if unavailable)."""
    from bench.forward import ForwardConfig, run_forward

    res = run_forward(
        ForwardConfig(
            nets=["style"], sizes=sizes, batches=[1], variants=["worker"], reps=reps,
            warmup=1, tiny=tiny, device="cpu",
        ),
        progress=False,
    )  # fmt: skip
    rows = res["rows"]
    chosen = "worker" if any(r["variant"] == "worker" for r in rows) else "fp32"
    return {r["out_px"]: r["ms_per_image"] for r in rows if r["variant"] == chosen}, chosen


def run_encode(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    levels = [int(v) for v in args.levels.split(",") if v.strip()]
    reps = args.reps
    if args.quick:
        if args.sizes == "256,512,1024":
            sizes = [256, 512]
        if args.levels == "0,1,3,6,9":
            levels = [0, 1, 6]
        reps = min(reps, 3)
    level = configured_level()
    if level not in levels:
        levels = sorted({*levels, level})
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    fwd: dict[int, float] = {}
    fwd_variant = "none"
    if not args.no_forward:
        fwd, fwd_variant = forward_ms(sizes, reps, args.tiny)
    rows = []
    for size in sizes:
        pixels = synthetic_array(size, size, seed=11)
        for fmt in formats:
            for lvl in levels if fmt == "png" else [level]:
                ms, nbytes = time_encode(pixels, fmt, lvl, reps)
                rows.append(
                    {
                        "out_px": size,
                        "format": fmt,
                        "png_level": lvl if fmt == "png" else None,
                        "configured": fmt == "png" and lvl == level,
                        "encode_ms": ms,
                        "bytes": nbytes,
                        "mb_per_s": size * size * 3 / 1e6 / (ms / 1000.0),
                        "forward_ms": fwd.get(size),
                        "encode_over_forward": ratio(ms, fwd.get(size, float("nan"))),
                    }
                )
                print(
                    f"[encode] {size:5}px {fmt:4} level {lvl}  {ms:8.2f} ms  {nbytes:>9} B"
                    + (f"  ({rows[-1]['encode_over_forward']:.2f} x forward)" if fwd else ""),
                    flush=True,
                )
    pool_rows = []
    threads = [int(t) for t in args.pool_threads.split(",") if t.strip()]
    for size in sizes if threads else []:
        pixels = synthetic_array(size, size, seed=11)
        for count in threads:
            ms = time_pool(pixels, level, args.pool_batch, count, reps)
            first = next((r["ms_per_image"] for r in pool_rows if r["out_px"] == size), ms)
            pool_rows.append(
                {"out_px": size, "threads": count, "batch": args.pool_batch,
                 "ms_per_image": ms, "speedup": ratio(first, ms)}
            )  # fmt: skip
            print(
                f"[encode] {size:5}px batch of {args.pool_batch}, {count} thread(s): "
                f"{ms:7.2f} ms per image ({pool_rows[-1]['speedup']:.2f}x)",
                flush=True,
            )
    return {
        "configured_png_level": level,
        "forward_variant": fwd_variant,
        "reps": reps,
        "rows": rows,
        "pool": pool_rows,
    }


def encode_markdown(result: dict[str, Any]) -> str:
    headers = [
        "out px", "format", "PNG level", "configured", "encode ms", "KiB", "MB/s (raw)",
        "forward ms", "encode / forward",
    ]  # fmt: skip
    rows = [
        [r["out_px"], r["format"], r["png_level"], r["configured"], r["encode_ms"],
         r["bytes"] / 1024.0, r["mb_per_s"], r["forward_ms"], r["encode_over_forward"]]
        for r in result["rows"]
    ]  # fmt: skip
    text = markdown_table(headers, rows, [0, 0, 0, 0, 2, 1, 1, 1, 3])
    text += (
        f"\nConfigured PNG_COMPRESS_LEVEL = {result['configured_png_level']}. Forward pass: style "
        f"net, batch 1, `{result['forward_variant']}` path, same run.\n"
    )
    if result.get("pool"):
        text += "\nA batch encoded on a pool of threads (the worker's `ENCODE_THREADS`):\n\n"
        text += markdown_table(
            ["out px", "threads", "batch", "ms per image", "x first"],
            [[r["out_px"], r["threads"], r["batch"], r["ms_per_image"], r["speedup"]]
             for r in result["pool"]],
            [0, 0, 0, 2, 2],
        )  # fmt: skip
    return text


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = run_encode(args)
    out = Path(args.out)
    write_report(out, args.name, "encode", "Encode cost", result, encode_markdown(result))
    png_rows = [r for r in result["rows"] if r["format"] == "png"]
    sizes = sorted({r["out_px"] for r in png_rows})
    levels = sorted({r["png_level"] for r in png_rows})
    series = {
        f"PNG level {lvl}": [
            next((r["encode_ms"] for r in png_rows if r["out_px"] == s and r["png_level"] == lvl),
                 float("nan"))
            for s in sizes
        ]
        for lvl in levels
    }  # fmt: skip
    if any(r["forward_ms"] for r in png_rows):
        series["forward (style, b=1)"] = [
            next((r["forward_ms"] for r in png_rows if r["out_px"] == s), float("nan"))
            or float("nan")
            for s in sizes
        ]
    plot_bars([f"{s}px" for s in sizes], series, out / f"{args.name}.png",
              title="PNG encode vs forward pass", ylabel="ms (log)", log=True)  # fmt: skip
    print(f"[encode] wrote {out / args.name}.json / .md / .png")
    return result

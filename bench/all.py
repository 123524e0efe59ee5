"""``python -m bench all [--quick]``: every benchmark in turn, and one summary against the targets.

``--quick`` (``make bench``) keeps each part short enough for the whole run to take a few
minutes on a 2-core CPU; its numbers are noisier than the full runs' but measured the same way.
A part that fails is reported as failed and the rest still run.
"""

from __future__ import annotations

import argparse
import importlib
import math
import time
import traceback
from pathlib import Path
from typing import Any

from bench.report import fmt, machine_info, write_json, write_markdown

PARTS = ("forward", "encode", "load", "backpressure", "batching", "e2e")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="short versions (make bench)")
    parser.add_argument("--tiny", action="store_true", help="tiny nets and sizes (smoke test)")
    parser.add_argument("--zoo", default=None, help="zoo folder for the served models")
    parser.add_argument("--only", default=",".join(PARTS), help="parts to run, comma-separated")


def part_argv(part: str, quick: bool, tiny: bool, zoo: str | None, out: str) -> list[str]:
    """The command line each part runs with (also printed, so any number can be reproduced)."""
    zoo_args = ["--zoo", zoo] if zoo else []
    tiny_args = ["--tiny"] if tiny else []
    q = ["--quick"] if quick else []
    common = ["--out", out]
    if part == "forward":
        sizes = ["--sizes", "64", "--batches", "1,2"] if tiny else []
        return ["forward", *q, *tiny_args, *sizes, *common]
    if part == "encode":
        sizes = ["--sizes", "64,128"] if tiny else []
        return ["encode", *q, *tiny_args, *sizes, *common]
    if part == "load":
        sizes = "64,96" if tiny else "256,192,320x240"
        conc = "1,2,4" if tiny else "1,2,4,8"
        n = "8" if tiny else ("16" if quick else "48")
        return ["load", "--spawn", *tiny_args, *zoo_args, "--sizes", sizes, "--concurrency", conc,
                "--requests", n, "--warmup", "1", *common]  # fmt: skip
    if part == "backpressure":
        # 16 callers against a queue limit of 4: the API must shed load with 503 + Retry-After
        size = "32" if tiny else "256"
        return ["load", "--spawn", *tiny_args, *zoo_args, "--sizes", size, "--concurrency", "16",
                "--requests", "48", "--warmup", "0", "--api-env", "MAX_QUEUE_DEPTH=4",
                "--name", "backpressure", *common]  # fmt: skip
    if part == "batching":
        size = ["--size", "64", "--mixed-sizes", "48,64,80x56"] if tiny else []
        return ["batching", *q, *tiny_args, *zoo_args, *size, *common]
    if part == "e2e":
        size = ["--size", "64"] if tiny else []
        return ["e2e", *q, *tiny_args, *zoo_args, *size, *common]
    raise ValueError(part)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's targets, each with the measured value (None when its part did not run)."""
    out: list[dict[str, Any]] = []
    fwd = results.get("forward") or {}
    rows = [
        r for r in fwd.get("rows", [])
        if r["net"] == "style" and r["out_px"] == 256 and r["batch"] == 1
        and r["variant"] == "worker"
    ]  # fmt: skip
    speed = rows[0]["speedup_vs_fp32"] if rows else None
    quality = rows[0]["psnr_vs_fp32_db"] if rows else None
    out.append(_t("fast path vs naive fp32, style 256 px b1", speed, ">=", 3.0, "x"))
    out.append(_t("fast path PSNR vs fp32, style 256 px", quality, ">=", 40.0, "dB"))
    e2e = results.get("e2e") or {}
    out.append(
        _t("e2e p50 / (forward+encode), c=1, 512 px style", e2e.get("e2e_p50_over_bare"),
           "<=", 1.15, "x")
    )  # fmt: skip
    bt = (results.get("batching") or {}).get("targets", {})
    out.append(_t("batching throughput, c=8 256 px same-size", bt.get("throughput_ratio"),
                  ">=", 1.3, "x"))  # fmt: skip
    out.append(_t("batching p99, c=8 256 px same-size", bt.get("p99_ratio"), "<=", 1.5, "x"))
    load = results.get("load") or {}
    errors = sum(lvl["requests"] - lvl["ok"] for lvl in load.get("levels", [])) if load else None
    out.append(_t("load sweep errors (below backpressure limit)", errors, "<=", 0, ""))
    bp = results.get("backpressure") or {}
    if bp:
        codes: dict[str, int] = {}
        for lvl in bp.get("levels", []):
            for code, count in lvl["errors"].items():
                codes[code] = codes.get(code, 0) + count
        other = sum(n for code, n in codes.items() if code != "503")
        out.append(_t("past the queue limit: 503 answers", codes.get("503", 0), ">=", 1, ""))
        out.append(_t("past the queue limit: timeouts or other errors", other, "<=", 0, ""))
    return out


def _t(name: str, value: Any, op: str, goal: float, unit: str) -> dict[str, Any]:
    ok = None
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        ok = value >= goal if op == ">=" else value <= goal
    return {"target": name, "value": value, "goal": f"{op} {goal:g}{unit}", "met": ok}


def main(args: argparse.Namespace) -> dict[str, Any]:
    from bench.__main__ import SUBCOMMANDS, build_parser

    out = Path(args.out)
    parser = build_parser()
    wanted = [p.strip() for p in args.only.split(",") if p.strip()]
    results: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    for part in PARTS:
        if part not in wanted:
            continue
        argv = part_argv(part, args.quick, args.tiny, args.zoo, str(out))
        print(f"[all] === {part}: python -m bench {' '.join(argv)}", flush=True)
        started = time.perf_counter()
        try:
            sub = parser.parse_args(argv)
            module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
            results[part] = module.main(sub)
            status = "ok"
        except Exception as exc:  # one broken part must not hide the others' numbers
            traceback.print_exc()
            status = f"failed: {type(exc).__name__}: {str(exc)[:500]}"
        runs.append(
            {"part": part, "argv": argv, "status": status, "wall_s": time.perf_counter() - started}
        )
    checks = targets(results)
    meta = machine_info()
    lines = ["| part | command | status | wall s |", "|---|---|---|---:|"]
    for r in runs:
        cmd = "python -m bench " + " ".join(r["argv"])
        lines.append(f"| {r['part']} | `{cmd}` | {r['status']} | {r['wall_s']:.0f} |")
    lines += ["", "| target | measured | goal | met |", "|---|---:|---|---|"]
    for c in checks:
        met = "-" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['target']} | {fmt(c['value'], 2)} | {c['goal']} | {met} |")
    body = "\n".join(lines) + "\n\nEach part's own tables: the `.md` files beside this one.\n"
    write_markdown(out / "all.md", "Benchmarks" + (" (quick)" if args.quick else ""), body, meta)
    write_json(out / "all.json", {"benchmark": "all", "meta": meta, "runs": runs,
                                  "targets": checks})  # fmt: skip
    print(body)
    return {"runs": runs, "targets": checks}

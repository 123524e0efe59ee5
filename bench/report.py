"""Writing benchmark results: JSON (everything), Markdown tables (for the README), PNG plots.

Every benchmark writes the three side by side into one output folder, named after the
subcommand, so a run can be diffed, pasted into the README and looked at.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def jsonable(obj: Any) -> Any:
    """NaN/inf -> None and tuples -> lists, so the JSON is strict (json.loads-able anywhere)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n")
    return path


def write_report(
    out: Path, name: str, benchmark: str, title: str, result: dict[str, Any], table: str
) -> dict[str, Any]:
    """What every single-table benchmark leaves behind: ``name.json`` (the whole result, tagged
    with the benchmark and the machine), ``name.md`` (its table under a title and the machine
    line) and the table on stdout. Returns the machine facts for a caller that adds plots."""
    meta = machine_info()
    write_json(out / f"{name}.json", {"benchmark": benchmark, "meta": meta, **result})
    write_markdown(out / f"{name}.md", title, table, meta)
    print(table)
    return meta


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: numbers rounded, NaN/None as an em dash-free '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int | Sequence[int] = 1
) -> str:
    """A GitHub-flavoured Markdown table; numeric cells right-aligned.

    ``digits`` is one number of decimals for all columns or one per column.
    """
    per_col = [digits] * len(headers) if isinstance(digits, int) else list(digits)
    cells = [[fmt(c, per_col[i]) for i, c in enumerate(row)] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows) if rows else False
        for i in range(len(headers))
    ]
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    lines.extend("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells)
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    """Where the numbers came from: the README must say which machine ran them."""
    info: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = os.getloadavg()[0]
    try:
        info["git_rev"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["git_rev"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_markdown(levels: Sequence[dict[str, Any]]) -> str:
    """The load test's table: one row per concurrency level / arrival rate."""
    headers = [
        "mode",
        "conc",
        "rate/s",
        "requests",
        "ok",
        "errors",
        "img/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "queue ms",
        "compute ms",
        "encode ms",
        "other ms",
        "batch",
    ]
    rows = []
    for s in levels:
        lat = s["latency_ms"]
        answered = s.get("error_p50_ms", {})  # absent from reports written before it
        errors = (
            ", ".join(
                f"{k}: {v}" + (f" (p50 {answered[k]:.0f} ms)" if k in answered else "")
                for k, v in s["errors"].items()
            )
            or "0"
        )
        rows.append(
            [
                s["mode"],
                s["concurrency"],
                s.get("offered_rate", s["rate"]),
                s["requests"],
                s["ok"],
                errors,
                s["images_per_s"],
                lat["p50"],
                lat["p90"],
                lat["p99"],
                lat["max"],
                s["server_ms"]["queue"],
                s["server_ms"]["compute"],
                s["server_ms"]["encode"],
                s["server_ms"]["other"],
                s["batch_size"],
            ]
        )
    digits = [1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 2]
    return markdown_table(headers, rows, digits)


def plot_load(levels: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Latency percentiles and throughput against concurrency (closed) / offered rate (open)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        ("closed", "concurrency", "concurrent callers"),
        ("open", "rate", "offered rate (req/s)"),
    ]
    present = [g for g in groups if any(s["mode"] == g[0] for s in levels)]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 2, figsize=(11, 4 * len(present)), squeeze=False)
    for row, (mode, key, xlabel) in enumerate(present):
        sel = sorted((s for s in levels if s["mode"] == mode), key=lambda s: s[key])
        xs = [s[key] for s in sel]
        lat_ax, thr_ax = axes[row]
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^-."), ("max", "x:")):
            lat_ax.plot(xs, [_nan(s["latency_ms"][q]) for s in sel], style, label=q)
        lat_ax.set_xlabel(xlabel)
        lat_ax.set_ylabel("per-image latency (ms)")
        lat_ax.set_title(f"{mode} loop: latency")
        lat_ax.grid(True, alpha=0.3)
        lat_ax.legend()
        thr_ax.plot(xs, [_nan(s["images_per_s"]) for s in sel], "o-", color="tab:green")
        thr_ax.set_xlabel(xlabel)
        thr_ax.set_ylabel("images / s")
        thr_ax.set_title(f"{mode} loop: throughput")
        thr_ax.grid(True, alpha=0.3)
        if mode == "closed" and len(xs) > 1 and min(xs) > 0:
            lat_ax.set_xscale("log", base=2)
            thr_ax.set_xscale("log", base=2)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_bars(
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    path: Path,
    *,
    title: str,
    ylabel: str,
    log: bool = False,
) -> Path:
    """Grouped bars (e.g. ms/image per path for each net and size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(series))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [_nan(v) for v in values], width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _nan(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and value is not None else math.nan


def write_markdown(path: Path, title: str, body: str, meta: dict[str, Any] | None = None) -> Path:
    """A small Markdown report: title, the machine it ran on, then the tables."""
    lines = [f"# {title}", ""]
    if meta:
        lines.append(
            f"Machine: {meta.get('cpu', '?')} ({meta.get('cpu_count', '?')} CPUs), "
            f"{meta.get('platform', '')}; load avg at start {fmt(meta.get('loadavg_1m'), 2)}; "
            f"{meta.get('timestamp', '')}."
        )
        if meta.get("device"):
            lines[-1] += f" Device: {meta['device']}."
        lines.append("")
    lines.append(body.rstrip() + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path

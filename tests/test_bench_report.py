"""Reporting: percentiles on known samples, Server-Timing / Prometheus parsing, and the three
report files (JSON, Markdown, PNG) written and readable."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from bench.images import parse_size, parse_sizes, synthetic_array
from bench.loadgen import LevelResult, Sample
from bench.report import load_markdown, markdown_table, plot_load, write_json
from bench.servertiming import histogram_delta, parse_prometheus, parse_server_timing
from bench.stats import percentile, summarize


def test_percentiles_of_1_to_100_interpolate_linearly() -> None:
    values = list(range(100, 0, -1))  # unsorted on purpose
    # rank = q/100 * 99: p50 -> 49.5 -> between 50 and 51
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 100


def test_percentiles_small_and_degenerate_samples() -> None:
    assert percentile([7.0], 99) == 7.0
    assert percentile([10.0, 20.0], 50) == pytest.approx(15.0)
    assert percentile([10.0, 20.0, 30.0, 40.0], 90) == pytest.approx(37.0)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_reports_count_mean_extremes() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert s["count"] == 4
    assert s["mean"] == pytest.approx(2.5)
    assert (s["min"], s["max"]) == (1.0, 4.0)
    assert s["p50"] == pytest.approx(2.5)
    assert math.isnan(summarize([])["p99"])


def test_server_timing_parsing() -> None:
    header = 'queue;dur=1.5, compute;dur=20;desc="fwd, bf16", encode;dur=3.25, batch;desc="4"'
    parsed = parse_server_timing(header)
    assert parsed == {"queue": 1.5, "compute": 20.0, "encode": 3.25, "batch_size": 4.0}
    assert parse_server_timing("batch_size;dur=8") == {"batch_size": 8.0}
    assert parse_server_timing("cache;desc=hit, foo") == {}
    assert parse_server_timing(None) == {}


def test_prometheus_histogram_delta() -> None:
    before = parse_prometheus(
        '# HELP x\nbatch_size_sum{model="a"} 10\nbatch_size_count{model="a"} 5\nother 1\n'
    )
    after = parse_prometheus(
        'batch_size_sum{model="a"} 30\nbatch_size_count{model="a"} 9\n'
        'batch_size_sum{model="b"} 8\nbatch_size_count{model="b"} 1\nother 7\n'
    )
    total, count = histogram_delta(before, after, "batch_size")
    assert (total, count) == (28.0, 5.0)


def test_sizes_parse() -> None:
    assert parse_size("512") == (512, 512)
    assert parse_size("640x480") == (640, 480)
    assert parse_sizes("256, 64x32") == [(256, 256), (64, 32)]
    with pytest.raises(ValueError):
        parse_size("abc")
    arr = synthetic_array(40, 30, seed=1)
    assert arr.shape == (30, 40, 3)
    assert (arr == synthetic_array(40, 30, seed=1)).all()


def _level(conc: int, latencies: list[float], statuses: list[int | str]) -> LevelResult:
    lvl = LevelResult(mode="closed", workload="w", concurrency=conc, wall_s=2.0)
    for i, (lat, st) in enumerate(zip(latencies, statuses, strict=True)):
        server = {"queue": 1.0, "compute": 10.0, "encode": 2.0, "batch_size": float(conc)}
        lvl.samples.append(Sample(i * 0.1, lat, st, (64, 64), 100, server if st == 200 else {}))
    return lvl


def test_level_summary_counts_errors_and_throughput() -> None:
    lvl = _level(2, [0.010, 0.020, 0.030, 0.5], [200, 200, 200, 503])
    s = lvl.summary()
    assert s["requests"] == 4 and s["ok"] == 3
    assert s["errors"] == {"503": 1}
    assert s["images_per_s"] == pytest.approx(1.5)  # 3 ok images over 2 s wall
    assert s["latency_ms"]["p50"] == pytest.approx(20.0)  # the 503 is not a latency sample
    assert s["latency_ms"]["max"] == pytest.approx(30.0)
    assert s["server_ms"]["compute"] == pytest.approx(10.0)
    assert s["server_ms"]["other"] == pytest.approx(20.0 - 13.0)
    assert s["batch_size"] == pytest.approx(2.0)


def test_report_files_written(tmp_path: Path) -> None:
    levels = [
        _level(1, [0.01, 0.012, 0.011], [200, 200, 200]).summary(),
        _level(4, [0.02, 0.03, 0.05], [200, 200, "timeout"]).summary(),
    ]
    js = write_json(tmp_path / "r.json", {"levels": levels, "nan": math.nan})
    loaded = json.loads(js.read_text())
    assert loaded["nan"] is None
    assert loaded["levels"][1]["errors"] == {"timeout": 1}

    md = load_markdown(levels)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| mode | conc |")
    assert len(lines) == 2 + len(levels)
    assert "timeout: 1" in lines[3]

    png = plot_load(levels, tmp_path / "r.png", "test")
    assert png is not None
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 100


def test_markdown_table_alignment_and_digits() -> None:
    md = markdown_table(["a", "b"], [["x", 1.234], ["y|z", None]], digits=[0, 2])
    assert md.splitlines()[1] == "|---|---:|"
    assert "| x | 1.23 |" in md
    assert "| y\\|z | - |" in md


def test_merging_rounds_pools_samples_and_time() -> None:
    first = _level(2, [0.010, 0.020], [200, 200])
    first.merge(_level(2, [0.030, 0.040], [200, 503]))
    s = first.summary()
    assert (s["requests"], s["ok"], s["wall_s"]) == (4, 3, 4.0)
    assert s["images_per_s"] == pytest.approx(0.75)
    assert s["latency_ms"]["max"] == pytest.approx(30.0)
    assert s["errors"] == {"503": 1}
    # the second round's start times continue after the first round's wall time
    assert first.samples[2].start_s == pytest.approx(2.0)


def test_all_summary_checks_targets_from_results() -> None:
    from bench.all import part_argv, targets

    results = {
        "forward": {
            "rows": [
                {"net": "style", "out_px": 256, "batch": 1, "variant": "worker",
                 "speedup_vs_fp32": 3.2, "psnr_vs_fp32_db": 39.0},
                {"net": "style", "out_px": 256, "batch": 1, "variant": "fp32",
                 "speedup_vs_fp32": 1.0, "psnr_vs_fp32_db": math.inf},
            ]
        },
        "e2e": {"e2e_p50_over_bare": 1.2},
        "batching": {"targets": {"throughput_ratio": 1.4, "p99_ratio": 1.6}},
        "load": {"levels": [{"requests": 8, "ok": 8}, {"requests": 8, "ok": 7}]},
        "backpressure": {"levels": [{"errors": {"503": 5, "timeout": 1}}]},
    }  # fmt: skip
    met = {t["target"]: t["met"] for t in targets(results)}
    assert met == {
        "fast path vs naive fp32, style 256 px b1": True,
        "fast path PSNR vs fp32, style 256 px": False,
        "e2e p50 / (forward+encode), c=1, 512 px style": False,
        "batching throughput, c=8 256 px same-size": True,
        "batching p99, c=8 256 px same-size": False,
        "load sweep errors (below backpressure limit)": False,
        "past the queue limit: 503 answers": True,
        "past the queue limit: timeouts or other errors": False,
    }
    assert all(t["met"] is None for t in targets({}) if "queue limit" not in t["target"])
    argv = part_argv("backpressure", quick=True, tiny=False, zoo=None, out="/x")
    assert argv[:2] == ["load", "--spawn"] and "MAX_QUEUE_DEPTH=4" in argv

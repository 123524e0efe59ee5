"""``python -m bench peer``: both sides run in one process and the table carries the ratios."""

from __future__ import annotations

import json
from pathlib import Path

from bench.__main__ import main


def test_peer_bench_times_both_sides_and_reports_ratios(tiny_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = ["peer", "--zoo", str(tiny_zoo), "--style", "mosaic", "--sizes", "64", "96"]
    assert main([*argv, "--repeats", "2", "--gap-ms", "20", "--out", str(out)]) == 0
    result = json.loads((out / "peer.json").read_text())
    assert result["gap_ms"] == 20
    assert result["model"] == "mosaic" and result["runtime"] in ("openvino", "torch")
    assert [row["size"] for row in result["rows"]] == [64, 96]
    for row in result["rows"]:
        assert row["peer_ms"] > 0 and row["ours_ms"] > 0 and row["pairs"] == 2
        assert abs(row["ratio"] - row["ours_ms"] / row["peer_ms"]) < 1e-9
    table = (out / "peer.md").read_text()
    assert "| 64 |" in table and "| 96 |" in table and "calibration" in table
    assert "20 ms pause" in table

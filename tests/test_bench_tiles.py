"""``python -m bench tiles``: whole vs tiled cost per runtime, in one run, with the ratio."""

from __future__ import annotations

import json
from pathlib import Path

from bench.__main__ import main


def test_tiles_bench_times_whole_and_both_tiled_paths(tiny_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = ["tiles", "--zoo", str(tiny_zoo), "--models", "tiny_style", "--sides", "160", "224"]
    assert main([*argv, "--tile-size", "96", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads((out / "tiles.json").read_text())
    assert result["tile_size"] == 96 and result["threads"] == 1
    assert [row["side"] for row in result["rows"]] == [160, 224]
    for row in result["rows"]:
        assert row["runtime"] == "openvino"
        for key in ("whole_s_per_mp", "tiled_s_per_mp", "torch_tiled_s_per_mp"):
            assert row[key] > 0
        assert (
            abs(row["tiled_speedup"] - row["torch_tiled_s_per_mp"] / row["tiled_s_per_mp"]) < 1e-6
        )
    table = (out / "tiles.md").read_text()
    assert "| tiny_style | 160 |" in table and "TILE_SIZE 96" in table

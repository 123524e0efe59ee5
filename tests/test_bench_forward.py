"""The forward-pass benchmark on tiny nets and sizes: report rows, FLOP counting, PSNR."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from bench.__main__ import main as bench_main
from bench.forward import conv_flops, psnr


def test_conv_flops_matches_the_formula() -> None:
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    # 2 FLOPs (multiply + add) per MAC: 2 * Cin * Cout * k * k * H * W
    assert conv_flops(conv, (1, 3, 10, 12)) == 2 * 3 * 5 * 3 * 3 * 10 * 12
    assert conv_flops(conv, (2, 3, 10, 12)) == 2 * 2 * 3 * 5 * 3 * 3 * 10 * 12


def test_psnr_known_values() -> None:
    a = torch.zeros(1, 3, 4, 4)
    assert math.isinf(psnr(a, a))
    b = a + 0.1  # mse 0.01 -> 20 dB at peak 1
    assert psnr(a, b) == pytest.approx(20.0)


def test_forward_quick_on_tiny_nets(tmp_path: Path) -> None:
    rc = bench_main(
        ["forward", "--quick", "--tiny", "--sizes", "48", "--batches", "1,2",
         "--reps", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "forward.json").read_text())
    rows = data["rows"]
    nets = {r["net"] for r in rows}
    assert nets == {"style", "sr_x4", "sr_x8"}
    by_key = {(r["net"], r["batch"], r["variant"]): r for r in rows}
    for net in nets:
        for batch in (1, 2):
            ref = by_key[(net, batch, "fp32")]
            assert ref["speedup_vs_fp32"] == pytest.approx(1.0)
            assert ref["psnr_vs_fp32_db"] is None  # identical to itself: inf -> null in JSON
            assert ref["out_px"] == 48 and ref["ms_per_image"] > 0
            assert ref["gflop_per_image"] > 0
    assert {r["in_px"] for r in rows if r["net"] == "sr_x8"} == {6}
    assert {r["in_px"] for r in rows if r["net"] == "sr_x4"} == {12}
    # batch 2 does twice the work per call of batch 1
    s1, s2 = by_key[("style", 1, "fp32")], by_key[("style", 2, "fp32")]
    assert s2["ms_per_batch"] == pytest.approx(2 * s2["ms_per_image"])
    assert s1["gflop_per_image"] == pytest.approx(s2["gflop_per_image"])
    # every non-reference variant that ran is close to fp32 on these tiny nets
    others = [r for r in rows if r["variant"] != "fp32"]
    assert others, data["skipped"]
    assert all(r["psnr_vs_fp32_db"] is None or r["psnr_vs_fp32_db"] > 30 for r in others)
    md = (tmp_path / "forward.md").read_text()
    assert "| style | 48 | 1 | fp32 |" in md
    with Image.open(tmp_path / "forward.png") as img:
        assert img.format == "PNG"


def test_encode_bench_times_a_batch_on_encode_pools(tmp_path: Path) -> None:
    """``bench encode --pool-threads 1,2``: the worker's ENCODE_THREADS question (is a batch's
    encoding faster on a pool?) answered per size in one run, against the first pool size."""
    rc = bench_main(
        ["encode", "--sizes", "32,48", "--levels", "1", "--formats", "png", "--reps", "1",
         "--no-forward", "--pool-threads", "1,2", "--pool-batch", "3", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    pool = json.loads((tmp_path / "encode.json").read_text())["pool"]
    assert [(r["out_px"], r["threads"], r["batch"]) for r in pool] == [
        (32, 1, 3), (32, 2, 3), (48, 1, 3), (48, 2, 3)
    ]  # fmt: skip
    assert all(r["ms_per_image"] > 0 for r in pool)
    assert [r["speedup"] for r in pool if r["threads"] == 1] == [1.0, 1.0]
    assert "ENCODE_THREADS" in (tmp_path / "encode.md").read_text()

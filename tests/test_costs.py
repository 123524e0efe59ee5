"""What a job costs: the worker measures whole and tiled images apart, and the API prices each
job by the figure for its path (issue 15's known gap: tiled big jobs run in PyTorch at several
times the whole-image cost per pixel, and were admitted at the whole-image figure)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jobqueue.protocol import ModelCost
from worker.costs import SMOOTHING, CostTracker, probe, tiled_probe_side
from worker.engine import Engine


def test_whole_and_tiled_measurements_are_averaged_apart() -> None:
    tracker = CostTracker("w1", "cpu")
    tracker.record("m", 0.5, 1_000_000, probe=True, tiling=(1024, 0))
    tracker.record("m", 3.0, 1_000_000, probe=True, tiled=True)
    cost = tracker.get("m")
    assert cost is not None
    assert (cost.seconds_per_megapixel, cost.tiled_seconds_per_megapixel) == (0.5, 3.0)
    tracker.record("m", 1.0, 1_000_000)  # a whole-image batch moves only the whole figure
    assert cost.seconds_per_megapixel == pytest.approx(0.5 + SMOOTHING * 0.5)
    assert cost.tiled_seconds_per_megapixel == 3.0
    tracker.record("m", 2.0, 1_000_000, tiled=True)
    assert cost.tiled_seconds_per_megapixel == pytest.approx(3.0 - SMOOTHING * 1.0)
    assert (cost.samples, cost.tiled_samples, cost.tile_input_side) == (2, 2, 1024)
    # Inputs up to the threshold are priced whole, bigger ones tiled.
    assert cost.estimate(2_000_000, 1024, 512) == pytest.approx(2 * cost.seconds_per_megapixel)
    assert cost.estimate(2_000_000, 1025, 512) == pytest.approx(
        2 * cost.tiled_seconds_per_megapixel
    )
    # ... unless the worker runs images up to a pixel count whole (OpenVINO on a CPU).
    cost.whole_max_pixels = 2048 * 2048
    assert not cost.tiled(2048, 2048) and not cost.tiled(4000, 1000)
    assert cost.tiled(2049, 2048) and cost.tiled(5000, 1000)


def test_the_first_figure_of_either_kind_stands_in_for_the_other() -> None:
    tracker = CostTracker("w1", "cpu")
    tracker.record("m", 4.0, 1_000_000, tiled=True, tiling=(256, 0))
    cost = tracker.get("m")
    assert cost is not None and cost.samples == 0
    assert cost.seconds_per_megapixel_at(100, 100) == cost.seconds_per_megapixel_at(300, 9) == 4.0
    tracker.record("m", 1.0, 1_000_000)  # the first real whole-image figure replaces it
    assert (cost.seconds_per_megapixel, cost.samples) == (1.0, 1)
    untiled = ModelCost("n", 1.0)  # never tiled (or an older worker): one figure for all
    assert untiled.seconds_per_megapixel_at(10_000, 10_000) == 1.0


def test_a_cost_published_by_an_older_worker_still_decodes() -> None:
    """A rolling upgrade: the API reads what a worker without tiled figures wrote."""
    raw = json.dumps({"model": "m", "seconds_per_megapixel": 0.7, "samples": 3, "worker": "w"})
    cost = ModelCost.decode(raw)
    assert (cost.tiled_samples, cost.tile_input_side) == (0, 0)
    assert cost.estimate(1_000_000, 5000, 5000) == pytest.approx(0.7)
    assert ModelCost.decode(cost.encode()) == cost


@pytest.mark.parametrize("name", ["tiny_style", "x4"])
def test_the_tiled_probe_runs_tiles_and_the_engine_says_so(tiny_zoo: Path, name: str) -> None:
    engine = Engine(zoo_dir=tiny_zoo, tile_size=128, precision="fp32")
    factor = 4 if name == "x4" else 1
    # TILE_SIZE / factor, or more where that could not advance a tile by its overlap
    threshold, whole_max_pixels = engine.tiling(name)
    assert threshold >= 128 // factor and whole_max_pixels == 0
    side = tiled_probe_side(engine, name, 1.5)
    assert side == int(threshold * 1.5) * factor
    assert tiled_probe_side(engine, name, 0) == 0
    seconds, pixels = probe(engine, name, side, tiled=True)
    assert seconds > 0 and pixels == side * side
    rng = np.random.default_rng(0)
    for input_side, tiled in ((threshold, False), (threshold + 8, True)):
        pixels_in = rng.integers(0, 256, (input_side, input_side, 3), dtype=np.uint8)
        (out,) = engine.run([(name, pixels_in)])
        assert out.tiled is tiled


def test_openvino_runs_images_whole_up_to_the_pixel_limit(tiny_zoo: Path) -> None:
    """Above TILE_SIZE but within WHOLE_MAX_PIXELS a whole image runs in OpenVINO (exact, and
    4-5x cheaper per pixel on a CPU than tiles); beyond it, or when a probe forces it, tiles."""
    engine = Engine(
        zoo_dir=tiny_zoo, tile_size=64, precision="fp32", cpu_runtime="openvino",
        whole_max_pixels=200 * 200,
    )  # fmt: skip
    assert engine.model("tiny_style").runtime == "openvino"
    side, pixels = engine.tiling("tiny_style")
    assert 64 <= side < 190 and pixels == 200 * 200
    rng = np.random.default_rng(1)
    within = rng.integers(0, 256, (200, 192, 3), dtype=np.uint8)
    beyond = rng.integers(0, 256, (208, 200, 3), dtype=np.uint8)
    (whole,) = engine.run([("tiny_style", within)])
    (tiled,) = engine.run([("tiny_style", beyond)])
    assert not whole.tiled and tiled.tiled
    with engine.forced_tiles():
        (forced,) = engine.run([("tiny_style", within)])
    assert forced.tiled
    # The torch runtime has no cheaper whole path: it tiles above TILE_SIZE as before.
    torch_engine = Engine(
        zoo_dir=tiny_zoo, tile_size=64, precision="fp32", cpu_runtime="torch",
        whole_max_pixels=200 * 200,
    )  # fmt: skip
    assert torch_engine.tiling("tiny_style")[1] == 0
    assert torch_engine.run([("tiny_style", within)])[0].tiled

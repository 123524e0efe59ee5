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
    tracker.record("m", 0.5, 1_000_000, probe=True, tile_input_side=1024)
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
    assert cost.estimate(2_000_000, input_side=1024) == pytest.approx(
        2 * cost.seconds_per_megapixel
    )
    assert cost.estimate(2_000_000, input_side=1025) == pytest.approx(
        2 * cost.tiled_seconds_per_megapixel
    )


def test_the_first_figure_of_either_kind_stands_in_for_the_other() -> None:
    tracker = CostTracker("w1", "cpu")
    tracker.record("m", 4.0, 1_000_000, tiled=True, tile_input_side=256)
    cost = tracker.get("m")
    assert cost is not None and cost.samples == 0
    assert cost.seconds_per_megapixel_at(100) == cost.seconds_per_megapixel_at(300) == 4.0
    tracker.record("m", 1.0, 1_000_000)  # the first real whole-image figure replaces it
    assert (cost.seconds_per_megapixel, cost.samples) == (1.0, 1)
    untiled = ModelCost("n", 1.0)  # never tiled (or an older worker): one figure for all
    assert untiled.seconds_per_megapixel_at(10_000) == 1.0


def test_a_cost_published_by_an_older_worker_still_decodes() -> None:
    """A rolling upgrade: the API reads what a worker without tiled figures wrote."""
    raw = json.dumps({"model": "m", "seconds_per_megapixel": 0.7, "samples": 3, "worker": "w"})
    cost = ModelCost.decode(raw)
    assert (cost.tiled_samples, cost.tile_input_side) == (0, 0)
    assert cost.estimate(1_000_000, input_side=5000) == pytest.approx(0.7)
    assert ModelCost.decode(cost.encode()) == cost


@pytest.mark.parametrize("name", ["tiny_style", "x4"])
def test_the_tiled_probe_runs_tiles_and_the_engine_says_so(tiny_zoo: Path, name: str) -> None:
    engine = Engine(zoo_dir=tiny_zoo, tile_size=128, precision="fp32")
    factor = 4 if name == "x4" else 1
    # TILE_SIZE / factor, or more where that could not advance a tile by its overlap
    threshold = engine.tile_input_side(name)
    assert threshold >= 128 // factor
    side = tiled_probe_side(engine, name, 1.5)
    assert side == int(threshold * 1.5) * factor
    assert tiled_probe_side(engine, name, 0) == 0
    seconds, pixels = probe(engine, name, side)
    assert seconds > 0 and pixels == side * side
    rng = np.random.default_rng(0)
    for input_side, tiled in ((threshold, False), (threshold + 8, True)):
        pixels_in = rng.integers(0, 256, (input_side, input_side, 3), dtype=np.uint8)
        (out,) = engine.run([(name, pixels_in)])
        assert out.tiled is tiled

"""The zoo this repository ships: every model loads, is small, and says how it was made."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_zoo.manifest import ModelEntry, read_manifest
from model_zoo.registry import load_model, sha256_file

ZOO = Path(__file__).resolve().parents[1] / "model_zoo"
ENTRIES = read_manifest(ZOO).models
# In copyright (../shared/data/README.md): never to be shipped.
RESTRICTED_STYLES = {"rain_princess", "la_muse"}


def test_the_zoo_ships_both_tasks() -> None:
    kinds = {entry.kind for entry in ENTRIES}
    assert kinds == {"style", "sr"}
    factors = {entry.factor for entry in ENTRIES if entry.kind == "sr"}
    assert factors == {4, 8}


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_shipped_model_loads_and_records_its_training(entry: ModelEntry) -> None:
    path = ZOO / entry.weights
    assert path.stat().st_size < 10 * 1024 * 1024
    assert sha256_file(path) == entry.sha256
    assert entry.iterations > 0 and entry.wall_time_s > 0 and entry.hardware
    assert entry.description
    net, _ = load_model(entry.name, root=ZOO)
    with torch.no_grad():
        out = net(torch.rand(1, 3, 20, 24))
    scale = entry.factor or 1
    assert out.shape == (1, 3, 20 * scale, 24 * scale)
    assert out.min() >= 0 and out.max() <= 1
    training = entry.training
    if entry.kind == "style":
        # A multi-style net records one image per slot (a distilled one its teacher's).
        images = [s.style_image for s in entry.styles if s.style_image]
        for image in images or [training["style_image"]]:
            assert Path(image).stem not in RESTRICTED_STYLES
        keys = ["image_size", "batch_size"]
        if entry.loss != "distilled":  # its loss is the pixel error to the teacher
            keys += ["content_weight", "style_weight", "tv_weight"]
        for key in keys:
            assert training[key] > 0, key
    else:
        assert training["factor"] == entry.factor and training["loss"] == entry.loss
    # Every model records the runs behind its weights (model_zoo.manifest.lineage_of): none for
    # one trained from scratch, the parent's chain for a fine-tune, an add-style run (its
    # --base is its parent) or a distilled net (its --teacher).
    lineage = training["lineage"]
    parent = training.get("init_from") or training.get("base") or training.get("teacher")
    assert bool(lineage) == bool(parent)
    if lineage:
        assert lineage[-1]["name"] == parent
        assert all(run["iterations"] > 0 and run["hardware"] for run in lineage)
    total = entry.iterations + sum(run["iterations"] for run in lineage)
    assert training["total_iterations"] == total

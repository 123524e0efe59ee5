"""Zoo registry (sha256, rebuild from manifest, no pickle) and the apply CLI round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_zoo.imaging import to_tensor
from model_zoo.manifest import read_manifest
from model_zoo.registry import (
    ModelNotFoundError,
    WeightsIntegrityError,
    list_models,
    load_model,
    save_model,
    sha256_file,
)
from worker import apply


def test_load_rebuilds_architecture_and_checks_sha(tiny_zoo: Path) -> None:
    net, entry = load_model("x4", root=tiny_zoo)
    assert entry.kind == "sr" and entry.factor == 4
    assert not net.training
    assert sha256_file(tiny_zoo / entry.weights) == entry.sha256
    assert {m.name for m in list_models(tiny_zoo)} == {"tiny_style", "mosaic", "x4", "x8"}


def test_the_same_weights_saved_again_have_the_same_sha256(tiny_zoo: Path, tmp_path: Path) -> None:
    """The manifest names weights by sha256; a save's bytes must not depend on chance (with
    two metadata keys, safetensors wrote them in either order: every other save differed)."""
    net, entry = load_model("x4", root=tiny_zoo)
    hashes = {
        save_model(net, name="x4", kind="sr", arch=entry.arch, root=tmp_path / str(i)).sha256
        for i in range(8)
    }
    assert len(hashes) == 1


def test_tampered_weights_are_refused(tiny_zoo: Path) -> None:
    entry = read_manifest(tiny_zoo).get("mosaic")
    path = tiny_zoo / entry.weights
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        load_model("mosaic", root=tiny_zoo)


def test_unknown_model_lists_available(tiny_zoo: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_model("nope", root=tiny_zoo)
    assert "mosaic" in str(info.value) and "x8" in str(info.value)


def test_apply_cli_round_trip(tiny_zoo: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    source = tmp_path / "in.jpg"
    Image.fromarray(rng.integers(0, 255, (21, 30, 3), dtype=np.uint8)).save(source)
    target = tmp_path / "out.png"
    assert (
        apply.main(
            [
                *("--model", "x4", "--precision", "fp32", "--zoo", str(tiny_zoo)),
                *(str(source), "-o", str(target)),
            ]
        )
        == 0
    )
    result = Image.open(target)
    assert result.size == (120, 84)
    net, _ = load_model("x4", root=tiny_zoo)
    with torch.no_grad():
        expected = net(to_tensor(Image.open(source).convert("RGB"))).clamp(0, 1)
    got = to_tensor(result)
    assert (got - expected).abs().max().item() <= 0.5 / 255 + 1e-6


def test_apply_cli_unknown_model_exits_2(tiny_zoo: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(source)
    code = apply.main(["--model", "nope", "--zoo", str(tiny_zoo), str(source), "-o", "x.png"])
    assert code == 2

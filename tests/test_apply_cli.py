"""``python -m worker.apply``: the service's engine on files (list, styles, mixes, alpha,
folders, tiling), without Redis or HTTP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker import apply

from .conftest import add_tiny_multistyle


def _photo(path: Path, width: int, height: int, seed: int, alpha: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256])
    pixels = np.clip(rgb.transpose(1, 2, 0) + rng.integers(0, 40, (height, width, 3)), 0, 255)
    if alpha:
        pixels = np.concatenate([pixels, (xx * 255 // max(width - 1, 1))[..., None]], axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), "RGBA" if alpha else "RGB").save(path)
    return path


@pytest.fixture()
def zoo(tiny_zoo: Path) -> Path:
    add_tiny_multistyle(tiny_zoo)
    return tiny_zoo


def test_list_names_every_style_and_upscaler(zoo: Path, capsys: pytest.CaptureFixture) -> None:
    assert apply.main(["--list", "--zoo", str(zoo)]) == 0
    out = capsys.readouterr().out
    assert "ms_a" in out and "tiny_multi slot 1" in out and "mosaic" in out
    assert "x4" in out and "x8" in out and "identity" not in out


def test_a_style_keeps_the_alpha_channel(zoo: Path, tmp_path: Path) -> None:
    source = _photo(tmp_path / "in.png", 40, 30, 1, alpha=True)
    target = tmp_path / "out.png"
    assert apply.main(["--zoo", str(zoo), "--style", "ms_a", str(source), "-o", str(target)]) == 0
    result = np.asarray(Image.open(target))
    assert result.shape == (30, 40, 4)
    assert (result[..., 3] == np.asarray(Image.open(source))[..., 3]).all()


def test_a_folder_with_a_mix_and_controls_writes_next_to_each_input(
    zoo: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    for i in range(3):
        _photo(folder / ("sub" if i else "") / f"p{i}.jpg", 48, 36, i)
    argv = ["--zoo", str(zoo), "--mix", "ms_a:0.7,ms_b:0.3", "--strength", "0.5"]
    assert apply.main([*argv, "--keep-colors", "--max-side", "24", "--quiet", str(folder)]) == 0
    outputs = sorted(folder.rglob("*.mix-ms_a-ms_b.png"))
    assert len(outputs) == 3
    assert all(Image.open(p).size == (24, 18) for p in outputs)  # --max-side shrank them


def test_a_large_image_is_tiled_and_matches_the_whole_one(zoo: Path, tmp_path: Path) -> None:
    source = _photo(tmp_path / "big.png", 180, 150, 4)
    whole, tiled = tmp_path / "whole.png", tmp_path / "tiled.png"
    common = ["--zoo", str(zoo), "--style", "ms_b", "--precision", "fp32", str(source)]
    assert apply.main([*common, "-o", str(whole)]) == 0
    assert apply.main([*common, "--tile-size", "64", "-o", str(tiled)]) == 0
    a, b = np.asarray(Image.open(whole), int), np.asarray(Image.open(tiled), int)
    assert a.shape == b.shape == (150, 180, 3)
    assert np.abs(a - b).max() <= 1


def test_upscale_and_errors(zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _photo(tmp_path / "small.png", 12, 10, 5)
    assert (
        apply.main(
            ["--zoo", str(zoo), "--upscale", "4", str(source), "--out-dir", str(tmp_path / "o")]
        )
        == 0
    )
    assert Image.open(tmp_path / "o" / "small.x4.png").size == (48, 40)
    assert apply.main(["--zoo", str(zoo), "--style", "nope", str(source)]) == 2
    assert "available" in capsys.readouterr().err
    assert apply.main(["--zoo", str(zoo), "--mix", "ms_a:1,mosaic:1", str(source)]) == 2
    assert apply.main(["--zoo", str(zoo), "--style", "ms_a", "--strength", "2", str(source)]) == 2
    assert apply.main(["--zoo", str(zoo), "--style", "ms_a", str(tmp_path / "missing.png")]) == 2

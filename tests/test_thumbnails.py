"""Style thumbnails: ``scripts/make_thumbnails.py`` on a tiny zoo, and the shipped ones current.

The shipped check is what keeps the web page's gallery honest: a style retrained or added
without rerunning the script fails here (its weights' sha256 differs from the one the
thumbnail was made from), with the command to run in the message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_zoo.manifest import read_manifest
from scripts.make_thumbnails import DEFAULT_PHOTO, SOURCES_NAME, main, square_crop
from service.catalog import THUMBNAILS_DIR, thumbnail_path

REPO = Path(__file__).resolve().parent.parent
SHIPPED_ZOO = REPO / "model_zoo"
FIX = ".venv/bin/python scripts/make_thumbnails.py"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "JPEG"
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_shipped_styles_have_current_thumbnails() -> None:
    manifest = read_manifest(SHIPPED_ZOO)
    # Every public style (single-style nets and multi-style slots) with the weights it comes from.
    styles = {name: manifest.get(ref.model).sha256 for name, ref in manifest.styles().items()}
    assert styles, "the shipped zoo has no styles?"
    folder = SHIPPED_ZOO / THUMBNAILS_DIR
    made = {path.stem for path in folder.glob("*.jpg")}
    assert made == set(styles), f"thumbnails {sorted(made)} != styles {sorted(styles)}; run {FIX}"
    sources = json.loads((folder / SOURCES_NAME).read_text())
    for name, sha in styles.items():
        assert sources.get(name) == sha, f"{name}'s thumbnail predates its weights; run {FIX}"
        path = thumbnail_path(SHIPPED_ZOO, name)
        assert 2_000 < path.stat().st_size < 40_000, f"{path}: {path.stat().st_size} bytes"
        assert pixels(path).shape == (256, 256, 3)


def test_script_makes_thumbnails_for_a_zoo(tiny_zoo: Path) -> None:
    stale = tiny_zoo / THUMBNAILS_DIR / "retired_style.jpg"
    stale.parent.mkdir()
    Image.new("RGB", (8, 8)).save(stale, "JPEG")

    assert main(["--zoo", str(tiny_zoo), "--styles", "tiny_style", "--size", "64"]) == 0
    assert stale.exists(), "a partial run must not prune"
    assert not thumbnail_path(tiny_zoo, "mosaic").exists()
    assert json.loads((tiny_zoo / THUMBNAILS_DIR / SOURCES_NAME).read_text()) == {
        "tiny_style": read_manifest(tiny_zoo).get("tiny_style").sha256
    }

    assert main(["--zoo", str(tiny_zoo)]) == 0
    assert not stale.exists(), "the thumbnail of a style no longer in the zoo stays behind"
    first, second = (pixels(thumbnail_path(tiny_zoo, n)) for n in ("tiny_style", "mosaic"))
    assert first.shape == second.shape == (256, 256, 3)
    with Image.open(DEFAULT_PHOTO) as photo:
        source = np.asarray(square_crop(photo.convert("RGB"), 256), dtype=np.int16)
    assert np.abs(first - source).mean() > 10, "the thumbnail is not stylised"
    assert np.abs(first - second).mean() > 5, "two styles gave the same thumbnail"
    sources = json.loads((tiny_zoo / THUMBNAILS_DIR / SOURCES_NAME).read_text())
    assert set(sources) == {"tiny_style", "mosaic"}

    assert main(["--zoo", str(tiny_zoo), "--styles", "x4"]) == 2  # an SR model is no style


def test_script_runs_as_a_file(tiny_zoo: Path, tmp_path: Path) -> None:
    """How the README says to run it: by path, from anywhere, with the repository's packages."""
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts/make_thumbnails.py"), "--zoo", str(tiny_zoo),
         "--styles", "mosaic"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "mosaic.jpg" in out.stdout
    assert thumbnail_path(tiny_zoo, "mosaic").is_file()


@pytest.mark.parametrize("size", [(300, 200), (120, 180)])
def test_square_crop_is_centred(size: tuple[int, int]) -> None:
    width, height = size
    image = Image.new("RGB", size, (0, 0, 0))
    side = min(size)
    left, top = (width - side) // 2, (height - side) // 2
    image.paste((255, 255, 255), (left, top, left + side, top + side))
    tile = np.asarray(square_crop(image, 32))
    assert tile.shape == (32, 32, 3)
    assert tile.min() >= 250, "the crop includes the borders outside the centred square"

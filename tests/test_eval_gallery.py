"""``python -m evaluation gallery`` on tiny models: both JPEGs, their layout, the crop choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation import cli, gallery
from tests.conftest import add_tiny_pixel_sr


def _photo(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_gallery_writes_both_images(tiny_zoo: Path, tmp_path: Path) -> None:
    add_tiny_pixel_sr(tiny_zoo, seed=0)
    photos = [_photo(tmp_path / f"p{i}.png", 60 + i, 50, i) for i in range(3)]
    sr_photo = _photo(tmp_path / "sr.png", 72, 64, 9)
    styles_out, sr_out = tmp_path / "out" / "styles.jpg", tmp_path / "out" / "sr.jpg"
    rc = cli.main(
        [
            "gallery",
            "--zoo",
            str(tiny_zoo),
            "--photos",
            *map(str, photos),
            "--sr-photos",
            str(sr_photo),
            "--styles-out",
            str(styles_out),
            "--sr-out",
            str(sr_out),
            "--controls-out",
            str(tmp_path / "out" / "controls.jpg"),
            "--style-size",
            "48",
            "--cell",
            "200",
            "--sr-crop",
            "24",
            "--sr-cell",
            "160",
        ]
    )
    assert rc == 0
    with Image.open(styles_out) as img:
        assert img.format == "JPEG"
        # columns: photo + the two style models (mosaic, tiny_style); rows: three photos
        assert img.size == (3 * 200, 3 * (200 + gallery.LABEL_HEIGHT))
    with Image.open(tmp_path / "out" / "controls.jpg") as img:
        # photo + a strength ramp of 4; the style, keep-colours, max_side (no mix: no multi-style)
        assert img.size == (5 * 200, 2 * (200 + gallery.LABEL_HEIGHT))
    with Image.open(sr_out) as img:
        assert img.format == "JPEG"
        # x4 row: bicubic | x4_pixel | x4 | HR; x8 row: bicubic | x8 | HR
        assert img.size == (4 * 160, 2 * (160 + gallery.LABEL_HEIGHT))


def test_sr_columns_put_the_pixel_model_before_the_feature_model(tiny_zoo: Path) -> None:
    add_tiny_pixel_sr(tiny_zoo, seed=0)
    from model_zoo.registry import list_models

    order = gallery._sr_methods([e for e in list_models(tiny_zoo) if e.kind == "sr"])
    assert [e.name for e in order[4]] == ["x4_pixel", "x4"]
    assert [e.name for e in order[8]] == ["x8"]


def test_crop_goes_where_the_texture_is() -> None:
    rng = np.random.default_rng(0)
    array = np.full((64, 96, 3), 128, np.uint8)
    array[20:52, 56:90] = rng.integers(0, 256, (32, 34, 3), dtype=np.uint8)
    left, top, right, bottom = gallery.textured_crop_box(Image.fromarray(array), 24, stride=4)
    assert (right - left, bottom - top) == (24, 24)
    assert left >= 56 and right <= 90 and top >= 20 and bottom <= 52


def test_missing_photos_are_an_error(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["gallery", "--zoo", str(tiny_zoo), "--photos", str(tmp_path / "nope.jpg")])
    assert rc == 2
    assert "nope.jpg" in capsys.readouterr().err


def test_gallery_shows_each_slot_and_a_mix_ramp_for_multi_style_nets(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    from tests.conftest import add_tiny_multistyle

    add_tiny_multistyle(tiny_zoo)
    photos = [_photo(tmp_path / f"p{i}.png", 60, 52, i) for i in range(2)]
    out = tmp_path / "out"
    argv = ["gallery", "--zoo", str(tiny_zoo), "--photos", *map(str, photos)]
    argv += ["--sr-photos", str(photos[0]), "--styles-out", str(out / "styles.jpg")]
    argv += ["--sr-out", str(out / "sr.jpg"), "--controls-out", str(out / "controls.jpg")]
    assert cli.main([*argv, "--style-size", "48", "--cell", "200", "--sr-crop", "16"]) == 0
    with Image.open(out / "styles.jpg") as img:  # photo, ms_a, ms_b, mosaic, tiny_style
        assert img.size == (5 * 200, 2 * (200 + gallery.LABEL_HEIGHT))
    with Image.open(out / "controls.jpg") as img:  # the third row is the ms_a -> ms_b ramp
        assert img.size == (5 * 200, 3 * (200 + gallery.LABEL_HEIGHT))


def test_a_caption_wider_than_its_cell_wraps_instead_of_running_into_the_next() -> None:
    """The controls gallery's mix captions ("candy 0.75 / composition_vii 0.25") used to be
    drawn across the next two cells."""
    cell = 120
    tile = Image.new("RGB", (cell, cell), (0, 0, 0))
    long = "candy 0.75 / composition_vii 0.25"
    grid = gallery.labelled_grid([[(long, tile), ("b", tile)], [("c", tile), ("d", tile)]], cell)
    first_band = grid.height - 2 * cell - gallery.LABEL_HEIGHT
    lines = first_band // gallery.LABEL_HEIGHT
    assert lines >= 2 and first_band % gallery.LABEL_HEIGHT == 0
    assert grid.size == (2 * cell, 2 * cell + (lines + 1) * gallery.LABEL_HEIGHT)
    band = np.asarray(grid.crop((0, 0, 2 * cell, first_band)).convert("L"))
    # The second cell's band holds its one-letter caption only: ink stops near its left edge.
    ink = np.nonzero(band[:, cell:].min(axis=0) < 128)[0]
    assert ink.size and ink.max() < 20
    # and the first caption has ink on its second line, inside its own cell
    second_line = band[gallery.LABEL_HEIGHT :, :cell]
    assert (second_line < 128).any()
    # the tiles start below the grown band
    assert np.asarray(grid)[first_band + 1, 5].tolist() == [0, 0, 0]

"""The droplet measure flags a blown-out blob, and not a clean stylisation of the same photo."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.droplets import find_droplets


def _photo(size: int = 160) -> np.ndarray:
    """A smooth, photo-like image: gradients and soft shapes, nothing clipped."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    r = 0.35 + 0.3 * np.sin(3 * xx + 1.0) * np.cos(2 * yy)
    g = 0.45 + 0.25 * np.cos(4 * yy + xx)
    b = 0.5 + 0.2 * np.sin(5 * xx * yy + 0.5)
    return np.clip(np.stack([r, g, b], axis=2), 0.05, 0.95)


def _stylise(photo: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 'clean stylisation': recoloured and textured with strokes, but nothing blown out."""
    rng = np.random.default_rng(seed)
    strokes = rng.normal(0.0, 0.06, photo.shape[:2])[..., None]
    recoloured = photo[..., [2, 0, 1]] * 0.8 + 0.1
    return np.clip(recoloured + strokes, 0.05, 0.95).astype(np.float32)


def _disc(image: np.ndarray, centre: tuple[int, int], radius: int, colour: tuple) -> np.ndarray:
    out = image.copy()
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    out[inside] = colour
    return out


RED = (1.0, 0.15, 0.0)


def test_a_clean_stylisation_has_no_droplets() -> None:
    photo = _photo()
    assert find_droplets(_stylise(photo), photo) == []


def test_a_blown_out_blob_is_flagged_where_it_is() -> None:
    photo = _photo()
    output = _disc(_stylise(photo), (60, 90), 8, RED)
    (drop,) = find_droplets(output, photo)
    left, top, right, bottom = drop.box
    assert left <= 90 <= right and top <= 60 <= bottom
    assert 150 < drop.area < 260  # a radius-8 disc is ~200 px
    assert drop.colour[0] > 0.95 and drop.colour[2] < 0.05
    assert drop.contrast > 0.2 and drop.input_contrast < 0.1


@pytest.mark.parametrize("radius", [2, 60])
def test_specks_and_large_planes_are_not_droplets(radius: int) -> None:
    """A few pixels are noise, and a clipped area over 5% of the image is a colour plane."""
    photo = _photo()
    assert find_droplets(_disc(_stylise(photo), (80, 80), radius, RED), photo) == []


def test_a_blob_the_photo_has_is_style_unless_the_painting_lacks_its_colour() -> None:
    photo = _disc(_photo(), (60, 90), 8, (0.9, 0.2, 0.1))  # the photo has a red disc there
    output = _disc(_stylise(photo), (60, 90), 8, RED)
    assert find_droplets(output, photo) == []
    red_painting = np.tile(np.array(RED, dtype=np.float32), (500, 1))
    blue_painting = np.tile(np.array((0.1, 0.2, 0.8), dtype=np.float32), (500, 1))
    assert find_droplets(output, photo, palette=red_painting) == []
    assert len(find_droplets(output, photo, palette=blue_painting)) == 1


def test_a_dark_style_that_blackens_shadows_is_not_flagged() -> None:
    photo = _disc(_photo(), (100, 50), 14, (0.12, 0.1, 0.1))  # a dark region in the photo
    output = _disc(_stylise(photo), (100, 50), 14, (0.0, 0.01, 0.02))
    assert find_droplets(output, photo) == []


def test_sizes_must_match() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        find_droplets(np.zeros((10, 10, 3)), np.zeros((12, 10, 3)))

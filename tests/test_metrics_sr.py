"""PSNR / SSIM on Y (BT.601) with the SR conventions: known values and a skimage cross-check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from evaluation.metrics import (
    as_rgb01,
    bicubic_upscale,
    grid_levels,
    modcrop,
    psnr,
    psnr_y,
    rgb_to_y,
    shave,
    sr_scores,
    ssim,
    ssim_y,
    without_grid,
)
from training.losses import grid_loss


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth-plus-detail uint8 RGB image, kept in [30, 220] so offsets never clip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = 125 + 60 * np.sin(xx / 5.0 + seed) * np.cos(yy / 7.0)
    channels = [base + 20 * np.sin(xx / (3.0 + c)) + rng.normal(0, 8, base.shape) for c in range(3)]
    return np.clip(np.stack(channels, axis=2), 30, 220).round().astype(np.uint8)


def test_luma_matches_bt601_at_known_colours() -> None:
    colours = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0]]], dtype=np.uint8)
    y = rgb_to_y(colours)[0]
    assert y == pytest.approx([16.0, 235.0, 16.0 + 65.481, 16.0 + 128.553])


def test_grayscale_inputs_give_the_same_luma_as_rgb() -> None:
    gray = textured(20, 24)[..., 0]
    from_pil = rgb_to_y(Image.fromarray(gray, "L"))
    from_rgb = rgb_to_y(np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_allclose(from_pil, from_rgb)
    np.testing.assert_allclose(from_rgb, 16.0 + 219.0 * gray / 255.0)


def test_tensor_and_array_inputs_agree() -> None:
    img = textured(16, 18)
    tensor = torch.from_numpy(img).permute(2, 0, 1).float().div(255).unsqueeze(0)
    np.testing.assert_allclose(as_rgb01(tensor), img / 255.0, atol=1e-6)
    with pytest.raises(ValueError):
        as_rgb01(torch.zeros(2, 3, 8, 8))


def test_identical_images_score_infinite_psnr_and_unit_ssim() -> None:
    img = textured(40, 44)
    scores = sr_scores(img, img.copy(), factor=4)
    assert math.isinf(scores["psnr"])
    assert scores["ssim"] == pytest.approx(1.0)


def test_constant_offset_gives_the_hand_computed_psnr() -> None:
    hr = textured(40, 44)
    sr = hr + np.uint8(10)
    # Every RGB channel +10/255 moves Y by 10 * (65.481 + 128.553 + 24.966) / 255 = 8.588...
    dy = 10 * 219.0 / 255.0
    expected = 20 * math.log10(255.0 / dy)
    assert psnr_y(sr, hr, border=4) == pytest.approx(expected, abs=1e-9)
    assert psnr_y(sr, hr, border=0) == pytest.approx(expected, abs=1e-9)


def test_border_pixels_are_ignored() -> None:
    hr = textured(32, 32)
    sr = hr.copy()
    sr[:3, :] = 0
    sr[:, -3:] = 255
    assert math.isinf(psnr_y(sr, hr, border=3))
    assert ssim_y(sr, hr, border=3) == pytest.approx(1.0)
    assert psnr_y(sr, hr, border=2) < 30


def test_psnr_drops_as_noise_grows() -> None:
    hr = textured(32, 32).astype(np.float64)
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, hr.shape[:2])
    values = [psnr(hr[..., 0] + s * noise, hr[..., 0]) for s in (1, 2, 4, 8)]
    assert values == sorted(values, reverse=True)
    # Doubling the noise amplitude costs 20 log10(2) dB exactly.
    assert values[0] - values[1] == pytest.approx(20 * math.log10(2))


@pytest.mark.parametrize(("shape", "sigma"), [((40, 50), 5.0), ((64, 33), 20.0), ((11, 11), 3.0)])
def test_ssim_matches_scikit_image(shape: tuple[int, int], sigma: float) -> None:
    rng = np.random.default_rng(shape[0])
    a = rgb_to_y(textured(*shape, seed=shape[1]))
    b = np.clip(a + rng.normal(0, sigma, a.shape), 0, 255)
    reference = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim(a, b) == pytest.approx(reference, abs=1e-12)


def test_ssim_is_symmetric_bounded_and_falls_with_blur() -> None:
    img = Image.fromarray(textured(48, 48))
    ref = rgb_to_y(img)
    values = []
    for factor in (2, 3, 4):
        small = img.resize((48 // factor, 48 // factor), Image.Resampling.BICUBIC)
        blurred = rgb_to_y(small.resize((48, 48), Image.Resampling.BICUBIC))
        assert ssim(ref, blurred) == pytest.approx(ssim(blurred, ref))
        values.append(ssim(ref, blurred))
    assert all(-1.0 <= v < 1.0 for v in values)
    assert values == sorted(values, reverse=True)


def test_modcrop_crops_to_a_multiple_of_the_factor() -> None:
    img = Image.new("RGB", (13, 10))
    assert modcrop(img, 4).size == (12, 8)
    assert modcrop(img, 1).size == (13, 10)
    assert bicubic_upscale(modcrop(img, 4), 4).size == (48, 32)


def test_mismatched_or_too_small_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        sr_scores(textured(40, 40), textured(40, 36), factor=4)
    with pytest.raises(ValueError):
        shave(np.zeros((8, 8)), 4)
    with pytest.raises(ValueError):
        ssim(np.zeros((10, 10)), np.zeros((10, 10)))


def _pattern(period: int, seed: int) -> np.ndarray:
    """A zero-mean period x period tile."""
    tile = np.random.default_rng(seed).normal(size=(period, period))
    return tile - tile.mean()


@pytest.mark.parametrize("period", [4, 8])
def test_the_grid_measure_finds_a_pattern_on_the_lr_grid_and_nothing_else(period: int) -> None:
    rng = np.random.default_rng(0)
    reference = rng.uniform(40, 200, size=(96, 128))
    tile = _pattern(period, 1)
    pattern = np.tile(tile, (96 // period, 128 // period))
    rms = float(np.sqrt(np.mean(tile**2)))
    # A pattern on the grid is measured exactly, whatever the image under it...
    assert grid_levels(reference + pattern, reference, period) == pytest.approx(rms)
    # ... a flat offset or noise with no period is not a grid...
    noise = rng.normal(scale=5.0, size=reference.shape)
    assert grid_levels(reference + 7.0, reference, period) == pytest.approx(0.0, abs=1e-9)
    assert grid_levels(reference + noise, reference, period) < 0.1 * 5.0
    # ... nor is a pattern of another period (3 divides neither 4 nor 8).
    other = np.tile(_pattern(3, 2), (32, 43))[:96, :128]
    assert grid_levels(reference + other, reference, period) < 0.2 * rms
    # sr_scores reports it on Y after the border crop, which keeps the grid's phase.
    image = np.repeat(reference[..., None], 3, axis=2)
    patterned = np.clip(image + pattern[..., None] * 255 / 219, 0, 255)
    scores = sr_scores(patterned.astype(np.float32) / 255, image.astype(np.float32) / 255, period)
    assert scores["grid"] == pytest.approx(rms, rel=1e-3)


def test_the_grid_loss_is_the_grid_measure_squared_in_unit_range() -> None:
    """What the trainer penalises is what the evaluation measures: on a grey image, Y levels
    are 219 x the [0, 1] values, so levels = 219 x sqrt(loss)."""
    rng = np.random.default_rng(3)
    target = torch.from_numpy(rng.uniform(0.2, 0.8, size=(1, 1, 64, 64)))
    tile = torch.from_numpy(_pattern(4, 4)) * 0.01
    output = (target + tile.repeat(16, 16)).expand(1, 3, 64, 64)
    target = target.expand(1, 3, 64, 64)
    loss = float(grid_loss(output, target, 4))
    levels = grid_levels((16 + 219 * output[0, 0]).numpy(), (16 + 219 * target[0, 0]).numpy(), 4)
    assert loss > 0 and 219 * math.sqrt(loss) == pytest.approx(levels, rel=1e-5)
    assert float(grid_loss(target + 0.3, target, 4)) == pytest.approx(0.0, abs=1e-12)


def test_removing_the_grid_leaves_the_rest_of_the_output() -> None:
    rng = np.random.default_rng(5)
    reference = rng.uniform(40, 200, size=(64, 96, 3))
    detail = rng.normal(scale=4.0, size=reference.shape)  # what is not a grid stays
    pattern = np.tile(_pattern(4, 6)[..., None] * [1.0, 2.0, 0.5], (16, 24, 1))
    clean = without_grid(reference + detail + pattern, reference, 4)
    for channel in range(3):
        assert grid_levels(clean[..., channel], reference[..., channel], 4) < 1e-9
    np.testing.assert_allclose(clean - reference, detail - _grid_of(detail, 4), atol=1e-9)


def _grid_of(residual: np.ndarray, period: int) -> np.ndarray:
    phases = residual.reshape(
        residual.shape[0] // period, period, residual.shape[1] // period, period, -1
    ).mean(axis=(0, 2))
    phases -= phases.mean(axis=(0, 1), keepdims=True)
    return np.tile(phases, (residual.shape[0] // period, residual.shape[1] // period, 1))

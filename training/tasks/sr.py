"""Super-resolution x4 / x8: feature reconstruction at relu2_2 (``feat``) or per-pixel MSE
(``pixel``), plus TV, on HR crops degraded exactly as evaluation degrades them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.config import SRNetConfig
from training.data import degrade
from training.losses import feature_loss, grid_loss, pixel_loss, tv_loss
from training.settings import TrainSettings
from training.tasks.base import TrainingTask
from training.vgg import CONTENT_LAYER, VGG16Features


@dataclass
class SRSettings(TrainSettings):
    factor: int = 4
    loss: str = "feat"
    output: str = "tanh"
    # feat only: an extra per-pixel MSE term (content-weight units) that anchors colour, which
    # relu2_2 features barely constrain.
    pixel_weight: float = 0.0
    # feat only: the pattern on the LR pixel grid that the feature loss cannot see
    # (training.losses.grid_loss).
    grid_weight: float = 0.0


class SRTask(TrainingTask[SRSettings]):
    name: ClassVar[str] = "sr"
    kind: ClassVar[str] = "sr"
    settings_type: ClassVar[type[TrainSettings]] = SRSettings
    default_image_size: ClassVar[int] = 288
    default_iterations: ClassVar[int] = 200_000
    help: ClassVar[str] = "train a super-resolution net"
    vgg_layers: ClassVar[tuple[str, ...]] = (CONTENT_LAYER,)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--factor", type=int, default=4, choices=[4, 8])
        parser.add_argument("--loss", default="feat", choices=["feat", "pixel"])
        parser.add_argument(
            "--content-weight", type=float, default=1e5, help="weight of the feat or pixel term"
        )
        parser.add_argument(
            "--output",
            default="tanh",
            choices=["tanh", "bicubic_residual"],
            help="the paper's tanh image, or a residual added to bicubic (see SRNetConfig)",
        )
        parser.add_argument(
            "--pixel-weight", type=float, default=0.0, help="feat only: add this x per-pixel MSE"
        )
        parser.add_argument(
            "--grid-weight",
            type=float,
            default=0.0,
            help="feat only: add this x the residual's pattern on the LR grid (grid_loss)",
        )

    @classmethod
    def settings_from_values(cls, values: dict[str, Any]) -> TrainSettings:
        if values.get("tv_weight") is None:
            # TV fights the pixel loss's own smoothing; a little helps the feature loss.
            values["tv_weight"] = 0.0 if values.get("loss") == "pixel" else 1.0
        return super().settings_from_values(values)

    def architecture(self) -> SRNetConfig:
        s = self.settings
        return SRNetConfig(
            factor=s.factor,  # type: ignore[arg-type]
            upsample=s.upsample,  # type: ignore[arg-type]
            output=s.output,  # type: ignore[arg-type]
        )

    @property
    def needs_vgg(self) -> bool:
        return self.settings.loss == "feat"

    def prepare(self, vgg: VGG16Features | None, device: torch.device) -> None:
        self.vgg = vgg

    def loss(self, net: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        output = net(degrade(batch, s.factor))
        if s.loss == "feat":
            assert self.vgg is not None
            with torch.no_grad():
                target_feat = self.vgg.content(batch)
            output_feat = self.vgg.content(output)
            main = feature_loss(output_feat, target_feat)
        else:
            main = pixel_loss(output, batch)
        terms = {s.loss: s.content_weight * main, "tv": s.tv_weight * tv_loss(output)}
        if s.loss == "feat" and s.pixel_weight:
            terms["pixel"] = s.pixel_weight * pixel_loss(output, batch)
        if s.loss == "feat" and s.grid_weight:
            terms["grid"] = s.grid_weight * grid_loss(output, batch, s.factor)
        total = sum(terms.values())
        return total, {k: float(v.detach()) for k, v in terms.items()}  # type: ignore[return-value]

    def phase(self) -> dict[str, Any]:
        phase = super().phase()
        if self.settings.grid_weight:  # only when used: older phases still compare equal
            phase["grid_weight"] = self.settings.grid_weight
        return phase

    def sample_row(self, net: nn.Module, photo: torch.Tensor) -> list[torch.Tensor]:
        """bicubic | output | HR."""
        low = degrade(photo, self.settings.factor)
        bicubic = F.interpolate(low, size=photo.shape[-2:], mode="bicubic").clamp(0, 1)
        return [bicubic, net(low), photo]

    def manifest_fields(self) -> dict[str, Any]:
        return {"factor": self.settings.factor, "loss": self.settings.loss}

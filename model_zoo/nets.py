"""The feed-forward image transformation networks of Johnson et al. (2016).

Both nets take a batch of RGB images in [0, 1] and return RGB in [0, 1]. Every conv pads with
reflection by k // 2 (the common later form of the paper's reflection-padded input), which keeps
the nets fully convolutional: any input size works at test time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.config import (
    ArchConfig,
    MultiStyleNetConfig,
    Norm,
    OutputSquash,
    SRNetConfig,
    StyleNetConfig,
    Upsample,
)


def _norm_layer(kind: Norm, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ConvLayer(nn.Module):
    """Reflection-padded conv: zero padding causes border artefacts in stylised images."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.pad = nn.ReflectionPad2d(kernel // 2)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


class ConvNormReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, norm: Norm) -> None:
        super().__init__(
            ConvLayer(in_ch, out_ch, kernel, stride),
            _norm_layer(norm, out_ch),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """conv-norm-relu-conv-norm plus identity; no ReLU after the sum (as in the paper)."""

    def __init__(self, channels: int, norm: Norm) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvLayer(channels, channels, 3),
            _norm_layer(norm, channels),
            nn.ReLU(inplace=True),
            ConvLayer(channels, channels, 3),
            _norm_layer(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Upsample2x(nn.Module):
    """x2 upsampling. ``nearest+conv`` avoids the checkerboard artefacts of transposed convs."""

    def __init__(self, in_ch: int, out_ch: int, mode: Upsample, norm: Norm) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transposed":
            self.conv: nn.Module = nn.ConvTranspose2d(
                in_ch, out_ch, 3, stride=2, padding=1, output_padding=1
            )
        else:
            self.conv = ConvLayer(in_ch, out_ch, 3)
        self.norm = _norm_layer(norm, out_ch)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "transposed":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.act(self.norm(self.conv(x)))


def pad_to_valid(x: torch.Tensor, multiple: int, minimum: int) -> torch.Tensor:
    """Pad the bottom/right so each side is a multiple of ``multiple`` and at least ``minimum``.

    Reflection where the image is big enough (no visible border), replication for tiny inputs
    where reflection is undefined. Callers crop the output back.
    """
    height, width = x.shape[-2:]
    target_h = max(minimum, height + (-height) % multiple)
    target_w = max(minimum, width + (-width) % multiple)
    pad_h, pad_w = target_h - height, target_w - width
    if not (pad_h or pad_w):
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def pad_style_input(x: torch.Tensor) -> torch.Tensor:
    """What the style nets' ``forward`` pads an image to: sides divisible by 4 for the two
    stride-2 stages, and at least 8 so that the 3x3 reflection pads at 1/4 resolution have 2
    pixels to reflect. Exported runtimes (``worker.openvino_runtime``) call it themselves: a
    traced export keeps only the padding of its example's size."""
    return pad_to_valid(x, multiple=4, minimum=8)


def _squash(x: torch.Tensor, kind: OutputSquash) -> torch.Tensor:
    if kind == "tanh":
        return (torch.tanh(x) + 1.0) * 0.5
    return torch.sigmoid(x)


class StyleNet(nn.Module):
    """c9s1-32, d64, d128, R128 x5, u64, u32, c9s1-3 (about 1.68 M parameters at defaults).

    Inputs whose sides are not multiples of 4 (or are tiny) are padded and the output is
    cropped back, so the output always has exactly the input's height and width.
    """

    def __init__(self, config: StyleNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or StyleNetConfig()
        c, norm = self.config.base_channels, self.config.norm
        self.encoder = nn.Sequential(
            ConvNormReLU(3, c, 9, 1, norm),
            ConvNormReLU(c, 2 * c, 3, 2, norm),
            ConvNormReLU(2 * c, 4 * c, 3, 2, norm),
        )
        self.residuals = nn.Sequential(
            *[ResidualBlock(4 * c, norm) for _ in range(self.config.num_residual)]
        )
        self.decoder = nn.Sequential(
            Upsample2x(4 * c, 2 * c, self.config.upsample, norm),
            Upsample2x(2 * c, c, self.config.upsample, norm),
            ConvLayer(c, 3, 9),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = pad_style_input(x)
        y = self.decoder(self.residuals(self.encoder(x)))
        return _squash(y[..., :height, :width], self.config.output)


class SRNet(nn.Module):
    """c9s1-64, R64 x4, log2(f) x2-upsampling stages of 64, c9s1-3: output is exactly f x input."""

    def __init__(self, config: SRNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or SRNetConfig()
        c, norm = self.config.channels, self.config.norm
        stages = self.config.factor.bit_length() - 1
        self.head = ConvNormReLU(3, c, 9, 1, norm)
        self.residuals = nn.Sequential(
            *[ResidualBlock(c, norm) for _ in range(self.config.num_residual)]
        )
        self.upsample = nn.Sequential(
            *[Upsample2x(c, c, self.config.upsample, norm) for _ in range(stages)]
        )
        self.tail = ConvLayer(c, 3, 9)
        self.skip: BicubicUpsample | None = None
        if self.config.output == "bicubic_residual":
            self.skip = BicubicUpsample(self.config.factor)
            nn.init.zeros_(self.tail.conv.weight)
            nn.init.zeros_(self.tail.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        f = self.config.factor
        # The 9x9 reflection-padded head needs at least 5 pixels per side.
        x = pad_to_valid(x, multiple=1, minimum=5)
        y = self.tail(self.upsample(self.residuals(self.head(x))))
        if self.skip is not None:
            y = (self.skip(x) + y)[..., : height * f, : width * f]
            # Clipping while training would zero the gradient of every overshooting pixel, and
            # Adam's first steps overshoot (the 9x9x64 tail has 5184 inputs per output): the
            # net could never come back. The loss pulls outputs into range instead.
            return y if self.training else y.clamp(0.0, 1.0)
        return _squash(y[..., : height * f, : width * f], self.config.output)  # type: ignore[arg-type]


class BicubicUpsample(nn.Module):
    """Bicubic x f upscale with *reflected* borders, the base of the residual SR output.

    ``F.interpolate`` clamps at the border, which in a mixed-size batch would read the canvas
    filler next to a smaller image. Padding with an ``nn.ReflectionPad2d`` (which
    ``worker.ragged`` makes per-sample) and cropping the margin back keeps such batches exact:
    bicubic reads 2 input pixels either side, so every kept output pixel only sees the image.
    """

    margin = 2

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.pad = nn.ReflectionPad2d(self.margin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, m = self.factor, self.margin
        height, width = x.shape[-2:]
        y = F.interpolate(self.pad(x), scale_factor=f, mode="bicubic", align_corners=False)
        return y[..., m * f : m * f + height * f, m * f : m * f + width * f]


class ConditionalInstanceNorm2d(nn.Module):
    """Instance norm whose scale and shift are a per-sample mix of per-style rows.

    ``weights`` (N x S) picks each sample's style (one-hot) or mixes styles (a convex row): the
    scale and shift are ``weights @ table``, the convex combination of the styles' parameters
    (Dumoulin et al.'s interpolation). The normalisation itself is a plain
    ``nn.InstanceNorm2d`` child without affine parameters, so ``worker.ragged`` can make it exact
    for padded batches and give tiles frozen statistics, as for the single-style nets; the
    affine part is pointwise. Both are computed in float32: bf16 would round the statistics.
    """

    def __init__(self, channels: int, num_styles: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.scale = nn.Parameter(torch.ones(num_styles, channels))
        self.shift = nn.Parameter(torch.zeros(num_styles, channels))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        scale = (weights.float() @ self.scale.float())[:, :, None, None]
        shift = (weights.float() @ self.shift.float())[:, :, None, None]
        return (self.norm(x).float() * scale + shift).to(x.dtype)


class CINConv(nn.Module):
    """Reflection-padded conv, conditional instance norm, optional ReLU; optionally after a
    nearest x2 upsampling (no checkerboard artefacts)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        num_styles: int,
        *,
        stride: int = 1,
        relu: bool = True,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv = ConvLayer(in_ch, out_ch, kernel, stride)
        self.norm = ConditionalInstanceNorm2d(out_ch, num_styles)
        self.act: nn.Module = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.act(self.norm(self.conv(x), weights))


class CINResidualBlock(nn.Module):
    def __init__(self, channels: int, num_styles: int) -> None:
        super().__init__()
        self.first = CINConv(channels, channels, 3, num_styles)
        self.second = CINConv(channels, channels, 3, num_styles, relu=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return x + self.second(self.first(x, weights), weights)


class MultiStyleNet(nn.Module):
    """The Johnson generator with conditional instance norm after every conv (the last one
    included, as in Magenta's net: each style then sets its own output colour balance).

    ``forward(x, style_weights)``: x is N x 3 x H x W in [0, 1]; ``style_weights`` N x S rows
    (one-hot, or a convex mix of styles); None means style slot 0 for every sample, which
    keeps code that probes a net with ``net(x)`` (receptive field, calibration) working.
    """

    def __init__(self, config: MultiStyleNetConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        d2, d1 = config.decoder_channels or (c2, c1)
        s, k = config.num_styles, config.outer_kernel
        self.encoder = nn.ModuleList(
            [
                CINConv(3, c1, k, s),
                CINConv(c1, c2, 3, s, stride=2),
                CINConv(c2, c3, 3, s, stride=2),
            ]
        )
        self.residuals = nn.ModuleList(
            [CINResidualBlock(c3, s) for _ in range(config.num_residual)]
        )
        self.decoder = nn.ModuleList(
            [
                CINConv(c3, d2, 3, s, upsample=True),
                CINConv(d2, d1, 3, s, upsample=True),
                CINConv(d1, 3, k, s, relu=False),
            ]
        )

    full_precision_head: int = 0
    """How many leading layers run in float32 under a reduced-precision autocast. Not part of
    the config: the worker sets it when calibration finds that these weights lose too much in
    bf16 at the input end (the first conv sees the photo at full resolution, so rounding there
    is magnified by every layer after it) while the rest of the net rounds harmlessly."""

    def layers(self) -> list[nn.Module]:
        """Every layer in forward order; each takes ``(x, style_weights)``."""
        return [*self.encoder, *self.residuals, *self.decoder]

    def one_hot(self, index: int | torch.Tensor, batch: int = 1) -> torch.Tensor:
        """Style weights that pick slot ``index`` for every sample."""
        weights = torch.zeros(
            batch, self.config.num_styles, device=self.decoder[-1].norm.scale.device
        )
        weights[:, index] = 1.0
        return weights

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        if style_weights is None:
            style_weights = self.one_hot(0, x.shape[0])
        if style_weights.shape != (x.shape[0], self.config.num_styles):
            raise ValueError(
                f"style weights of shape {tuple(style_weights.shape)} for a batch of "
                f"{x.shape[0]} and {self.config.num_styles} styles"
            )
        x = pad_style_input(x)
        x = self.run_layers(x, style_weights)
        return _squash(x[..., :height, :width], self.config.output)

    def run_layers(
        self, x: torch.Tensor, style_weights: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Layers ``start:stop`` (all by default), the first ``full_precision_head`` of them
        outside any autocast."""
        layers = self.layers()
        for index in range(start, len(layers) if stop is None else stop):
            if index < self.full_precision_head and torch.is_autocast_enabled(x.device.type):
                with torch.autocast(x.device.type, enabled=False):
                    x = layers[index](x.float(), style_weights)
            else:
                x = layers[index](x, style_weights)
        return x


def max_full_precision_head(net: nn.Module) -> int:
    """How many leading layers of ``net`` can run in float32 ahead of a reduced-precision rest
    (``MultiStyleNet.full_precision_head``): all but the last for a multi-style net, none for
    a net that runs as one piece."""
    return len(net.layers()) - 1 if isinstance(net, MultiStyleNet) else 0


def build_net(config: ArchConfig) -> nn.Module:
    """Rebuild a net from its stored config (the manifest's ``arch`` field)."""
    if isinstance(config, MultiStyleNetConfig):
        return MultiStyleNet(config)
    if isinstance(config, StyleNetConfig):
        return StyleNet(config)
    if isinstance(config, SRNetConfig):
        return SRNet(config)
    raise TypeError(f"unknown architecture config: {type(config).__name__}")


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())

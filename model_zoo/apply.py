"""``python -m model_zoo.apply --model NAME in.jpg -o out.png``: one image through a zoo model.

This is the plain reference path (fp32 by default, no tiling, no batching); the service's
tests compare the worker's output against it.
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image
from torch import nn

from model_zoo.hardware import autocast
from model_zoo.imaging import load_rgb, to_image, to_tensor
from model_zoo.registry import ModelNotFoundError, WeightsIntegrityError, load_model


@torch.inference_mode()
def run_model(net: nn.Module, image: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Forward ``image`` (B x 3 x H x W in [0, 1]) through ``net``; output clamped to [0, 1]."""
    device = next(net.parameters()).device
    with autocast(device, precision):
        output = net(image.to(device))
    return output.float().clamp(0, 1)


def apply_to_image(net: nn.Module, img: Image.Image, precision: str = "fp32") -> Image.Image:
    return to_image(run_model(net, to_tensor(img), precision))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_zoo.apply", description=__doc__)
    parser.add_argument("input", help="image file (any format Pillow reads)")
    parser.add_argument("-o", "--output", required=True, help="output file (.png, .jpg, .webp)")
    parser.add_argument("--model", required=True, help="zoo model name (see --list)")
    parser.add_argument("--zoo", default=None, help="zoo folder (default: $MODEL_ZOO_DIR or ours)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        net, entry = load_model(args.model, root=args.zoo, device=args.device)
    except (ModelNotFoundError, WeightsIntegrityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = apply_to_image(net, load_rgb(args.input), args.precision)
    result.save(args.output)
    print(f"{entry.name}: {args.input} -> {args.output} ({result.width}x{result.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

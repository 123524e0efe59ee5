"""Conversions between files, PIL images and the nets' tensors (RGB, float32, [0, 1])."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image with its EXIF orientation applied, as 8-bit RGB."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> 1 x 3 x H x W float32 in [0, 1]."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return uint8_to_tensor(array)


def uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    """H x W x 3 (or B x H x W x 3) uint8 -> B x 3 x H x W float32 in [0, 1]."""
    tensor = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


def tensor_to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """B x 3 x H x W (or 3 x H x W) in [0, 1] -> uint8 B x H x W x 3, rounded to nearest."""
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    scaled = tensor.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def to_image(tensor: torch.Tensor) -> Image.Image:
    """1 x 3 x H x W or 3 x H x W in [0, 1] -> PIL RGB."""
    return Image.fromarray(tensor_to_uint8(tensor)[0], "RGB")

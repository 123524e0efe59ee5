"""Result images to bytes: PNG (default), JPEG or WebP.

PNG cost is dominated by zlib: level 1 is several times faster than Pillow's default 6 and only
slightly larger on photographic content (see the README's encode measurements), hence the
default ``PNG_COMPRESS_LEVEL=1``. JPEG cannot carry alpha: RGBA results are composited over
white rather than losing transparency to whatever colour transparent pixels happen to hold.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class EncodeOptions:
    png_compress_level: int = 1
    jpeg_quality: int = 90
    webp_quality: int = 90


def _to_image(pixels: np.ndarray) -> Image.Image:
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected H x W x 3|4 uint8, got {pixels.dtype} {pixels.shape}")
    return Image.fromarray(np.ascontiguousarray(pixels), "RGBA" if pixels.shape[2] == 4 else "RGB")


def encode(pixels: np.ndarray, fmt: str, options: EncodeOptions | None = None) -> tuple[bytes, str]:
    """Encode ``pixels`` (H x W x 3|4 uint8) as ``fmt``; returns (bytes, content type)."""
    options = options or EncodeOptions()
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"unsupported output format {fmt!r}; use one of {sorted(CONTENT_TYPES)}")
    image = _to_image(pixels)
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, "PNG", compress_level=options.png_compress_level)
    elif fmt == "jpeg":
        if image.mode == "RGBA":
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image, mask=image.getchannel("A"))
            image = background
        image.save(buffer, "JPEG", quality=options.jpeg_quality)
    else:
        image.save(buffer, "WEBP", quality=options.webp_quality, method=4)
    return buffer.getvalue(), CONTENT_TYPES[fmt]

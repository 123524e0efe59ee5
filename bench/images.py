"""Synthetic, deterministic test images for the benchmarks.

Photographs are not shipped with the repo, and the cost of PNG decode/encode depends on image
content (flat colour compresses ~100x better than noise), so the benchmark images are
photo-like on purpose: smooth gradients, a few hard edges, and mild sensor-like noise.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (width, height)

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")


def parse_size(text: str) -> Size:
    """``"512"`` -> (512, 512); ``"640x480"`` -> (640, 480) (width x height)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"bad image size {text!r}: use N or WxH")
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) else width
    if width < 1 or height < 1:
        raise ValueError(f"bad image size {text!r}: must be positive")
    return width, height


def parse_sizes(text: str) -> list[Size]:
    """Comma-separated sizes, e.g. ``"256,512,640x480"``."""
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise ValueError("no image sizes given")
    return sizes


def synthetic_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """HxWx3 uint8, photo-like and reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    phase = rng.uniform(0, 2 * np.pi, size=3).astype(np.float32)
    freq = rng.uniform(1.0, 4.0, size=3).astype(np.float32)
    img = np.empty((height, width, 3), dtype=np.float32)
    for c in range(3):
        img[..., c] = 0.5 + 0.35 * np.sin(freq[c] * np.pi * (xs + 0.6 * ys) + phase[c])
    # a few hard-edged blocks so convolutions and the PNG filter see edges
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = min(width, x0 + max(1, width // 4))
        y1 = min(height, y0 + max(1, height // 4))
        img[y0:y1, x0:x1, :] = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    img += rng.normal(0.0, 0.02, size=img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def synthetic_png(width: int, height: int, seed: int = 0) -> bytes:
    """The synthetic image as PNG bytes (what a client would upload)."""
    buf = io.BytesIO()
    Image.fromarray(synthetic_array(width, height, seed)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()

"""Training data: any folder tree of photos, random crops, and the SR degradation.

The degradation (Gaussian blur sigma=1.0, then bicubic downsampling) lives here once, because
evaluation must make low-resolution inputs exactly the way the model was trained on them.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.functional import gaussian_blur

from model_zoo.imaging import to_tensor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
BLUR_SIGMA = 1.0


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files below ``root`` (by suffix), sorted so runs are reproducible."""
    root = Path(root)
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return files


def degrade(hr: torch.Tensor, factor: int, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """HR (B x 3 x H x W, H and W multiples of ``factor``) -> LR by blur then bicubic downsampling.

    Bicubic with antialiasing matches what MATLAB's / PIL's ``imresize`` do when shrinking.
    """
    kernel = 2 * round(3 * sigma) + 1
    blurred = gaussian_blur(hr, [kernel, kernel], [sigma, sigma])
    height, width = hr.shape[-2] // factor, hr.shape[-1] // factor
    low = F.interpolate(blurred, size=(height, width), mode="bicubic", antialias=True)
    return low.clamp(0, 1)


def random_crop_resized(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Scale the shorter side to a random value in [size, 1.5 size], then take a random crop.

    Scaling first keeps crops of large photos from being texture-only close-ups; the jitter adds
    scale augmentation to a training set far smaller than the paper's 80k COCO images.
    """
    short = rng.randint(size, int(size * 1.5))
    scale = short / min(img.size)
    new_size = (max(size, round(img.width * scale)), max(size, round(img.height * scale)))
    img = img.resize(new_size, Image.BICUBIC)
    left = rng.randint(0, img.width - size)
    top = rng.randint(0, img.height - size)
    return img.crop((left, top, left + size, top + size))


class ImageFolderCrops(Dataset[torch.Tensor]):
    """Random ``size`` x ``size`` RGB crops from every readable image under ``root``.

    Unreadable files are skipped with a warning (once each) rather than crashing a long run.
    """

    def __init__(self, root: str | os.PathLike[str], size: int, seed: int = 0) -> None:
        self.files = find_images(root)
        self.size = size
        self.rng = random.Random(seed)
        self.bad: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def load(self, path: Path) -> Image.Image | None:
        try:
            with Image.open(path) as img:
                return ImageOps.exif_transpose(img).convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            if path not in self.bad:
                log.warning("skipping unreadable training image %s: %s", path, exc)
                self.bad.add(path)
            return None

    def __getitem__(self, index: int) -> torch.Tensor:
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            if path in self.bad:
                continue
            img = self.load(path)
            if img is not None:
                return to_tensor(random_crop_resized(img, self.size, self.rng))[0]
        raise RuntimeError(f"none of the {len(self.files)} images could be read")


class InfiniteSampler(torch.utils.data.Sampler[int]):
    """Endless reshuffled epochs: training is counted in iterations, not epochs."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed = length, seed

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.length, generator=generator).tolist()

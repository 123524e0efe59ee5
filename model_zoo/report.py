"""Run artefacts a person looks at after training: a sample grid and the loss curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model_zoo.imaging import to_image, to_tensor


def _square(img: Image.Image, size: int) -> Image.Image:
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))))
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


@torch.inference_mode()
def save_sample_grid(
    net: nn.Module,
    objective: Any,
    photos: Sequence[Image.Image],
    path: Path,
    settings: Any,
    device: torch.device,
    size: int | None = None,
) -> Path:
    """One row per photo: style = input | output; SR = bicubic | output | HR.

    ``size`` (default: the training crop) lets a style run also be judged at a larger size,
    where its textures read at a different scale relative to the content.
    """
    size = size or settings.image_size
    rows: list[list[Image.Image]] = []
    for photo in photos:
        hr = to_tensor(_square(photo, size)).to(device)
        inputs, _ = objective.inputs_and_targets(hr)
        output = net(inputs).clamp(0, 1)
        if settings.task == "style":
            rows.append([to_image(hr), to_image(output)])
        else:
            bicubic = F.interpolate(inputs, size=hr.shape[-2:], mode="bicubic").clamp(0, 1)
            rows.append([to_image(bicubic), to_image(output), to_image(hr)])
    grid = Image.new("RGB", (size * len(rows[0]), size * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            grid.paste(tile, (c * size, r * size))
    grid.save(path, quality=90)
    return path


def save_loss_curve(history: Sequence[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        iterations = [h["iteration"] for h in history]
        for key in (k for k in history[0] if k != "iteration"):
            values = [h[key] for h in history]
            window = max(1, len(values) // 100)
            smooth = [
                sum(values[max(0, i - window) : i + 1]) / len(values[max(0, i - window) : i + 1])
                for i in range(len(values))
            ]
            ax.plot(iterations, smooth, label=key)
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("iteration")
    ax.set_ylabel("weighted loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

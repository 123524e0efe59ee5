"""Run artefacts a person looks at while a run trains: sample grids and the loss curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from model_zoo.imaging import to_image, to_tensor


def square_crop(photo: Image.Image, size: int) -> torch.Tensor:
    """The photo's centre square at ``size`` px, as a 1 x 3 x size x size tensor."""
    scale = size / min(photo.size)
    img = photo.resize(
        (max(size, round(photo.width * scale)), max(size, round(photo.height * scale)))
    )
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return to_tensor(img.crop((left, top, left + size, top + size)))


def save_image_grid(rows: Sequence[Sequence[torch.Tensor]], size: int, path: Path) -> Path:
    """Rows of 1 x 3 x size x size tiles in [0, 1], as one JPEG."""
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (size * columns, size * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            grid.paste(to_image(tile.float().clamp(0, 1).cpu()), (c * size, r * size))
    grid.save(path, quality=90)
    return path


def save_loss_curve(history: Sequence[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        # A term may be absent from some steps (a multi-style batch without an identity sample).
        keys = list(dict.fromkeys(k for h in history for k in h if k != "iteration"))
        for key in keys:
            points = [(h["iteration"], h[key]) for h in history if key in h]
            iterations = [i for i, _ in points]
            values = [v for _, v in points]
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

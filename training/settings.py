"""What defines a training run. Each task extends :class:`TrainSettings` with its own fields, and
the manifest entry records the task's settings verbatim (``dataclasses.asdict``), so a field
that means nothing for a task never appears in its models' entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Run-time switches that say how to run, not what was trained: kept out of the manifest.
RUNTIME_ONLY = ("extra", "zoo", "teacher_zoo", "init_zoo")


@dataclass
class TrainSettings:
    """Settings every task shares."""

    task: str
    name: str
    data: str
    image_size: int
    batch_size: int = 4
    iterations: int = 40_000
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int = 500
    log_every: int = 10
    run_dir: str = "runs"
    zoo: str | None = None
    vgg_weights: str | None = None
    # The weight of the relu2_2 feature term (style's content; SR's feat or pixel term). The
    # same 1e5 everywhere keeps TV weights comparable: TV is a per-image *sum* (losses.py).
    content_weight: float = 1e5
    tv_weight: float = 3.0
    upsample: str = "nearest+conv"
    grad_clip: float = 0.0
    """Clip the gradient's global norm to this (0: off)."""
    warmup: int = 0
    """Linear learning-rate warm-up over this many iterations (0: off)."""
    lr_milestones: tuple[int, ...] = ()
    """Iterations from which the learning rate is multiplied by ``lr_gamma`` once more
    (``training.schedule``; empty: a constant rate after the warm-up)."""
    lr_gamma: float = 0.1
    ema_decay: float = 0.0
    """Export an exponential moving average of the weights (and BN statistics) with this decay
    per step instead of the last step's weights (0: off; ``training.averaging``)."""
    # Start from a zoo model's weights (same architecture): an SR feature run from the pixel
    # model, or a new style from a trained style net, which already reconstructs content: on
    # the CPU, starry_night from mosaic was usable after ~450 iterations, where runs from
    # scratch needed 1,000-1,600.
    init_from: str | None = None
    init_zoo: str | None = None
    """The zoo ``init_from`` is read from (None: ``zoo``). A fine-tune of a shipped model can
    then write into a zoo of its own without first copying the shipped one; a multi-style
    model cannot share a zoo with another net offering the same style names."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def resume(self) -> bool:
        return bool(self.extra.get("resume")) or self.export_only

    @property
    def export_only(self) -> bool:
        return bool(self.extra.get("export_only"))

"""The learning rate of each step: a linear warm-up, then step decay at fixed iterations.

A pure function of the iteration, so a resumed run (``--resume``) lands on the same rate
without any scheduler state in the checkpoint. Step decay is there because the CPU runs
showed that lowering the rate is what turns a plateau into progress: session 25's ``x4`` sat
in Adam's noise for 2,000 steps at 1e-4 and improved within 500 steps at 3e-5. The milestones
make that one declared run (recorded in the manifest) instead of a stop and a hand-made resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from training.settings import TrainSettings


def lr_scale(iteration: int, warmup: int, milestones: Sequence[int], gamma: float) -> float:
    """The factor on the base rate for the step that makes iteration ``iteration + 1``.

    ``warmup``: ramp linearly over that many steps (0: off). ``milestones``: from each of
    these iterations on, the rate is multiplied by ``gamma`` once more (torch's
    ``MultiStepLR`` semantics, counted in iterations)."""
    warm = min(1.0, (iteration + 1) / warmup) if warmup > 0 else 1.0
    return warm * gamma ** sum(iteration >= m for m in milestones)


def check_milestones(milestones: Sequence[int], gamma: float) -> None:
    """Refuse a schedule that cannot mean what was asked, before any step is spent."""
    if any(m <= 0 for m in milestones):
        raise ValueError(f"--lr-milestones must be positive iterations, not {list(milestones)}")
    if list(milestones) != sorted(set(milestones)):
        raise ValueError(f"--lr-milestones must increase, not {list(milestones)}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"--lr-gamma must lie in (0, 1], not {gamma}")


def apply_lr(optimizer: torch.optim.Optimizer, settings: TrainSettings, iteration: int) -> float:
    """Set every parameter group's rate for the step that makes iteration ``iteration + 1``
    (the schedule's base rate times the group's own ``lr_scale``); returns the base rate."""
    base = settings.lr * lr_scale(
        iteration, settings.warmup, settings.lr_milestones, settings.lr_gamma
    )
    for group in optimizer.param_groups:
        group["lr"] = base * group["lr_scale"]
    return base

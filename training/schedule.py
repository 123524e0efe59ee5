"""The learning rate of each step: a linear warm-up, then step decay at fixed iterations.

A pure function of the iteration, so a resumed run (``--resume``) lands on the same rate
without any scheduler state in the checkpoint. Step decay is there because the CPU runs
showed that lowering the rate is what turns a plateau into progress: session 25's ``x4`` sat
in Adam's noise for 2,000 steps at 1e-4 and improved within 500 steps at 3e-5. The milestones
make that one declared run (recorded in the manifest) instead of a stop and a hand-made resume.

The GPU campaign trains on a wall-clock budget, so it cannot know its iterations in advance:
its stages decay at fractions of their time instead (:func:`budget_decay`). Its optimizer holds
each rate as a one-element tensor on the device, which :func:`apply_lr` overwrites in place: a
captured CUDA graph reads the rate from that memory on every replay, so a decay reaches steps
the graph runs without any Python in between.
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
    return warm * _step_decay(iteration, milestones, gamma)


def _step_decay(position: float, boundaries: Sequence[float], gamma: float) -> float:
    """``gamma`` once more from each boundary on: the step decay of both schedules."""
    return gamma ** sum(position >= b for b in boundaries)


def _check_steps(boundaries: Sequence[float], gamma: float, option: str, gamma_option: str) -> None:
    """The refusals both schedules share: boundaries that do not increase, gamma off (0, 1]."""
    if list(boundaries) != sorted(set(boundaries)):
        raise ValueError(f"{option} must increase, not {list(boundaries)}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"{gamma_option} must lie in (0, 1], not {gamma}")


def check_milestones(milestones: Sequence[int], gamma: float) -> None:
    """Refuse a schedule that cannot mean what was asked, before any step is spent."""
    if any(m <= 0 for m in milestones):
        raise ValueError(f"--lr-milestones must be positive iterations, not {list(milestones)}")
    _check_steps(milestones, gamma, "--lr-milestones", "--lr-gamma")


def budget_decay(fraction: float, decay_at: Sequence[float], gamma: float) -> float:
    """The factor on the rate once ``fraction`` of a stage's training time has passed: ``gamma``
    once more from each of ``decay_at`` on (step decay in time, for a budget-bound stage)."""
    return _step_decay(fraction, decay_at, gamma)


def check_decay_fractions(decay_at: Sequence[float], gamma: float) -> None:
    """Refuse a budget decay that cannot mean what was asked, before the lease's time is spent."""
    if any(not 0.0 < at < 1.0 for at in decay_at):
        raise ValueError(f"--lr-decay-at takes fractions in (0, 1), not {list(decay_at)}")
    _check_steps(decay_at, gamma, "--lr-decay-at", "--lr-decay-gamma")


def apply_lr(
    optimizer: torch.optim.Optimizer,
    settings: TrainSettings,
    iteration: int,
    decay: float = 1.0,
) -> float:
    """Set every parameter group's rate for the step that makes iteration ``iteration + 1``
    (the schedule's base rate times ``decay`` times the group's own ``lr_scale``); returns the
    base rate. A rate held as a tensor is written in place (module docstring), never
    replaced: a CUDA graph captured with it keeps reading that tensor."""
    base = (
        decay
        * settings.lr
        * lr_scale(iteration, settings.warmup, settings.lr_milestones, settings.lr_gamma)
    )
    for group in optimizer.param_groups:
        rate = base * group["lr_scale"]
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
    return base

"""The model families the trainer knows: subcommand name -> task class."""

from __future__ import annotations

from training.tasks.base import TrainingTask
from training.tasks.distill import DistillTask
from training.tasks.multistyle import AddStyleTask, MultiStyleSettings, MultiStyleTask
from training.tasks.sr import SRSettings, SRTask
from training.tasks.style import StyleSettings, StyleTask

TASKS: dict[str, type[TrainingTask]] = {
    task.name: task for task in (StyleTask, MultiStyleTask, AddStyleTask, DistillTask, SRTask)
}

__all__ = [
    "TASKS",
    "AddStyleTask",
    "DistillTask",
    "MultiStyleSettings",
    "MultiStyleTask",
    "SRSettings",
    "SRTask",
    "StyleSettings",
    "StyleTask",
    "TrainingTask",
]

"""The contract between the training loop and a model family.

A task owns everything that differs between families: its settings and command-line options,
the architecture it builds, what it precomputes (style Grams), how a batch of photos becomes a
loss, what its sample grids show and which fields its manifest entry gets. The loop
(``training.loop.train``) owns what they share: device and precision, the optimiser,
checkpoints and resume, phases, the progress bar, stopping, export into the zoo. A new family is
one module under ``training/tasks/`` plus one line in ``training.tasks.TASKS``.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from PIL import Image
from torch import nn

from model_zoo.config import ArchConfig
from model_zoo.manifest import ModelEntry
from model_zoo.nets import build_net
from training.report import save_image_grid, square_crop
from training.settings import TrainSettings
from training.vgg import STYLE_LAYERS, VGG16Features

S = TypeVar("S", bound=TrainSettings)


class TrainingTask(ABC, Generic[S]):
    """One model family's training (module docstring)."""

    name: ClassVar[str]
    """The ``python -m training`` subcommand."""
    kind: ClassVar[str]
    """The manifest ``kind`` of the models it makes."""
    settings_type: ClassVar[type[TrainSettings]]
    default_image_size: ClassVar[int] = 256
    default_iterations: ClassVar[int] = 40_000
    help: ClassVar[str] = ""
    vgg_layers: ClassVar[tuple[str, ...]] = STYLE_LAYERS
    """The loss network's layers the objective reads; its VGG is built only that deep."""

    def __init__(self, settings: S) -> None:
        self.settings = settings

    # ------------------------------------------------------------------ command line

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The task's own options (the loop's common ones are added by ``training.cli``)."""

    @classmethod
    def settings_from_values(cls, values: dict[str, Any]) -> TrainSettings:
        """Build the settings from parsed options; ``tv_weight`` None means the task default."""
        if values.get("tv_weight") is None:
            values.pop("tv_weight", None)
        if "lr_milestones" in values:  # argparse gives a list; the settings are immutable
            values["lr_milestones"] = tuple(values["lr_milestones"])
        return cls.settings_type(**values)

    # ------------------------------------------------------------------ the model

    @abstractmethod
    def architecture(self) -> ArchConfig:
        """The net this run trains (stored in the manifest; ``--init-from`` must match it)."""

    def build_net(self) -> nn.Module:
        return build_net(self.architecture())

    def start_mismatch(self, entry: ModelEntry) -> str | None:
        """Why this run's net cannot start from ``entry``'s weights (None: it can). One check
        for ``--init-from`` and for the GPU campaign's choice of what to continue."""
        if entry.arch != self.architecture():
            return f"its architecture {entry.arch} differs from this run's {self.architecture()}"
        return None

    def init_from(self, net: nn.Module, source: nn.Module, entry: ModelEntry) -> None:
        """Start from a zoo model's weights (refused where :meth:`start_mismatch` says why)."""
        mismatch = self.start_mismatch(entry)
        if mismatch:
            raise ValueError(f"--init-from {entry.name}: {mismatch}")
        net.load_state_dict(source.state_dict())

    def trainable_parameters(self, net: nn.Module) -> Iterable[nn.Parameter]:
        return net.parameters()

    def param_groups(self, net: nn.Module) -> list[dict[str, Any]]:
        """The optimiser's parameter groups; a group's ``lr_scale`` multiplies the run's
        learning rate (and its warm-up) for that group."""
        return [{"params": list(self.trainable_parameters(net)), "lr_scale": 1.0}]

    def initial_lineage(self) -> list[dict[str, Any]]:
        """The runs behind the starting weights when they do not come from ``--init-from``
        (e.g. the base net ``add-style`` extends)."""
        return []

    # ------------------------------------------------------------------ the objective

    @property
    def needs_vgg(self) -> bool:
        return True

    def prepare(self, vgg: VGG16Features | None, device: torch.device) -> None:
        """Precompute what every step reuses (style Gram targets); called once per run."""

    @abstractmethod
    def loss(self, net: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward a batch of training crops (B x 3 x S x S in [0, 1]) and score it: the total
        to minimise and its weighted terms (for the log and the loss curve)."""

    def phase(self) -> dict[str, Any]:
        """The settings a resumed run may change (``--resume --lr ...``), recorded per phase."""
        s = self.settings
        phase = {"lr": s.lr, "tv_weight": s.tv_weight, "content_weight": s.content_weight}
        # Recorded only when used, so older entries' phases still compare equal on resume.
        if s.grad_clip:
            phase["grad_clip"] = s.grad_clip
        if s.warmup:
            phase["warmup"] = s.warmup
        if s.lr_milestones:
            phase |= {"lr_milestones": list(s.lr_milestones), "lr_gamma": s.lr_gamma}
        if s.ema_decay:
            phase["ema_decay"] = s.ema_decay
        return phase

    # ------------------------------------------------------------------ reporting

    @abstractmethod
    def sample_row(
        self, net: nn.Module, photo: torch.Tensor
    ) -> list[torch.Tensor] | list[list[torch.Tensor]]:
        """The tiles of a sample-grid row for one square photo (1 x 3 x S x S), left to right;
        or several rows (e.g. one per style)."""

    def sample_sizes(self) -> Sequence[int]:
        """Sizes at which ``samples*.jpg`` are written at every checkpoint."""
        return (self.settings.image_size,)

    @torch.inference_mode()
    def write_samples(
        self, net: nn.Module, photos: Sequence[Image.Image], run_dir: Path, device: torch.device
    ) -> list[Path]:
        """``samples.jpg`` at the crop size, plus ``samples_<size>.jpg`` for the other sizes."""
        paths = []
        for size in self.sample_sizes():
            rows: list[list[torch.Tensor]] = []
            for photo in photos:
                tiles = self.sample_row(net, square_crop(photo, size).to(device))
                if tiles and isinstance(tiles[0], list):
                    rows.extend(tiles)  # type: ignore[arg-type]
                else:
                    rows.append(tiles)  # type: ignore[arg-type]
            name = "samples.jpg" if size == self.settings.image_size else f"samples_{size}.jpg"
            paths.append(save_image_grid(rows, size, run_dir / name))
        return paths

    def manifest_fields(self) -> dict[str, Any]:
        """Entry fields besides the common ones (``factor``, ``loss``, ``styles``...)."""
        return {}

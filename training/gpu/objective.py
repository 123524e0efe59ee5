"""Each task's loss as a function that never waits for the device.

A task's ``loss`` (``training.tasks``) returns its terms as Python floats, draws multi-style
slots on the host and picks identity samples with a boolean mask: each of those waits for the
GPU, several times a step. That is harmless on a CPU, but on a GPU it stalls the queue every
step, and it makes a step impossible to capture as a CUDA graph, which is what removes the
launch overhead of these small steps. The objectives here compute *the same terms* (the
building blocks are the tasks' own: ``perceptual_terms``, ``style_loss``, ``feature_loss``,
``tv_loss``, ``degrade``) with everything on the device:

- multi-style slots come from a table made by the task's own ``draw_slots`` (the same balanced,
  shuffled cycle), indexed by a step counter that lives on the device;
- the identity term is a per-sample mask weighting instead of a boolean selection (equal:
  ``mean over identity samples * their share`` = ``sum of masked per-sample means / batch``);
- every term is always present (0 when a batch has no identity sample), so a captured graph
  has a fixed set of outputs.

``tests/test_gpu_campaign.py`` checks each objective against its task's ``loss`` on the same
batch and the same slots, so a change to a task's loss that is not made here fails there.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from training.data import degrade
from training.losses import feature_loss, grid_loss, pixel_loss, style_loss, tv_loss
from training.tasks import MultiStyleTask, SRTask, StyleTask, TrainingTask
from training.tasks.distill import DistillTask
from training.tasks.style import perceptual_terms
from training.vgg import CONTENT_LAYER

SLOT_TABLE_ROWS = 4096
"""Steps before the multi-style slot table repeats (each row a balanced draw)."""


class Objective(Protocol):
    names: tuple[str, ...]
    """The weighted terms, in the order they are returned (the total is their sum)."""

    def __call__(self, net: nn.Module, batch: torch.Tensor) -> list[torch.Tensor]: ...


class StyleObjective:
    """``StyleTask.loss`` without host reads."""

    names = ("content", "style", "tv")

    def __init__(self, task: StyleTask) -> None:
        self.task = task

    def __call__(self, net: nn.Module, batch: torch.Tensor) -> list[torch.Tensor]:
        s = self.task.settings
        terms = perceptual_terms(
            self.task.vgg, net(batch), batch, self.task.grams,
            content_weight=s.content_weight, style_weight=s.style_weight, tv_weight=s.tv_weight,
        )  # fmt: skip
        return [terms[name] for name in self.names]


class SRObjective:
    """``SRTask.loss`` without host reads."""

    def __init__(self, task: SRTask) -> None:
        self.task = task
        s = task.settings
        self.pixel = bool(s.loss == "feat" and s.pixel_weight)
        self.grid = bool(s.loss == "feat" and s.grid_weight)
        self.names = (s.loss, "tv", *(("pixel",) if self.pixel else ()))
        self.names += ("grid",) if self.grid else ()

    def __call__(self, net: nn.Module, batch: torch.Tensor) -> list[torch.Tensor]:
        s, vgg = self.task.settings, self.task.vgg
        output = net(degrade(batch, s.factor))
        if s.loss == "feat":
            assert vgg is not None
            with torch.no_grad():
                target = vgg.content(batch)
            main = feature_loss(vgg.content(output), target)
        else:
            main = pixel_loss(output, batch)
        terms = [s.content_weight * main, s.tv_weight * tv_loss(output)]
        if self.pixel:
            terms.append(s.pixel_weight * pixel_loss(output, batch))
        if self.grid:
            terms.append(s.grid_weight * grid_loss(output, batch, s.factor))
        return terms


class MultiStyleObjective:
    """``MultiStyleTask.loss`` without host reads (module docstring)."""

    def __init__(self, task: MultiStyleTask, batch: int, device: torch.device) -> None:
        self.task = task
        s = task.settings
        rows = [task.draw_slots(batch) for _ in range(SLOT_TABLE_ROWS)]
        self.table = torch.tensor(rows, dtype=torch.long, device=device)
        self.eye = torch.eye(task.num_slots, device=device)  # one-hot rows by gathering
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.has_identity = bool(task.is_identity.any())
        self.names = (
            "content", "style", "tv",
            *(("saturation",) if s.saturation_penalty else ()),
            *(("identity",) if self.has_identity else ()),
        )  # fmt: skip
        self._logits: torch.Tensor | None = None
        self._watched: nn.Module | None = None

    def _watch(self, net: nn.Module) -> None:
        """Keep the last layer's pre-squash output (the saturation term reads it)."""
        if self._watched is net:
            return
        net.decoder[-1].register_forward_hook(  # type: ignore[index, union-attr]
            lambda module, args, out: setattr(self, "_logits", out)
        )
        self._watched = net

    def slots(self) -> torch.Tensor:
        """This step's slots (a table row), advancing the device-side step counter."""
        row = torch.remainder(self.step, self.table.shape[0])
        slots = torch.index_select(self.table, 0, row).view(-1)
        self.step.add_(1)
        return slots

    def next_rows(self, net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's slots and one-hot style rows; watches the logits when the saturation
        term is on."""
        if self.task.settings.saturation_penalty:
            self._watch(net)
        slots = self.slots()
        return slots, self.eye[slots]

    def saturation(self) -> torch.Tensor:
        """The weighted penalty on the last forward's pre-squash logits beyond the limit."""
        s = self.task.settings
        assert self._logits is not None
        # Consumed, not kept: a tensor held past the step keeps its whole autograd graph
        # alive, and with it the AccumulateGrad nodes the eager warm-up made on the default
        # stream, which broke the CUDA graph capture of the 2026-12-04 lease ("The
        # AccumulateGrad node's stream does not match", then cudaErrorStreamCaptureInvalidated).
        logits, self._logits = self._logits, None
        excess = torch.relu(logits.float().abs() - s.saturation_limit)
        return s.saturation_penalty * excess.pow(2).mean()

    def __call__(self, net: nn.Module, batch: torch.Tensor) -> list[torch.Tensor]:
        task, s = self.task, self.task.settings
        slots, weights = self.next_rows(net)
        output = net(batch, weights)
        out_feats = task.vgg(output)
        with torch.no_grad():
            target = task.vgg.content(batch)
        grams = {k: v[slots] for k, v in task.grams.items()}
        terms = [
            s.content_weight * feature_loss(out_feats[CONTENT_LAYER], target),
            style_loss(out_feats, grams, sample_weights=task.slot_style_weight[slots]),
            s.tv_weight * tv_loss(output),
        ]
        if s.saturation_penalty:
            terms.append(self.saturation())
        if self.has_identity:
            mask = task.is_identity[slots].float()
            per_sample = (output.float() - batch.float()).pow(2).mean(dim=(1, 2, 3))
            terms.append(s.identity_weight * (mask * per_sample).sum() / batch.shape[0])
        return terms


class DistillObjective(MultiStyleObjective):
    """``DistillTask.loss`` without host reads: the teacher's output for each sample's slot
    (the photo for the identity slot, by a mask), the mean absolute error to it, and the
    saturation term; the slot table and the logits watch are the multi-style objective's."""

    def __init__(self, task: DistillTask, batch: int, device: torch.device) -> None:
        super().__init__(task, batch, device)
        self.distill = task
        self.names = ("pixel", *(("saturation",) if task.settings.saturation_penalty else ()))

    def __call__(self, net: nn.Module, batch: torch.Tensor) -> list[torch.Tensor]:
        task = self.distill
        slots, weights = self.next_rows(net)
        with torch.no_grad():
            photo = batch.float()
            target = task.teacher(photo, weights).float()
            identity = task.is_identity[slots].view(-1, 1, 1, 1)
            target = torch.where(identity, photo, target)
        output = net(batch, weights)
        terms = [(output.float() - target).abs().mean()]
        if task.settings.saturation_penalty:
            terms.append(self.saturation())
        return terms


def objective_for(task: TrainingTask, batch: int, device: torch.device) -> Objective:
    """The device-only objective of a prepared task (``task.prepare`` has run)."""
    if isinstance(task, DistillTask):  # before MultiStyleTask, which it extends
        return DistillObjective(task, batch, device)
    if isinstance(task, MultiStyleTask):  # before StyleTask: add-style is a MultiStyleTask
        return MultiStyleObjective(task, batch, device)
    if isinstance(task, StyleTask):
        return StyleObjective(task)
    if isinstance(task, SRTask):
        return SRObjective(task)
    raise TypeError(f"no device objective for task {type(task).__name__}")

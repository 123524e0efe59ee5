"""A cheaper multi-style net taught by a trained one (knowledge distillation).

Why: on a CPU without bf16 kernels the served time follows MACs per pixel, and the shipped
net's 42k is 2.2x the peer's; a net of a quarter the MACs trained from scratch against the VGG
loss would need the full multi-style run again (4.4 s per step in fp32 on a 2-core CPU). The
teacher already *is* the function we want: matching its outputs needs no VGG at all, only its
forward pass and the student's, so one step costs a fraction of a perceptual-loss step and
the student sees many more photos in the same hours.

The student gets the teacher's slots (names, rows, style images, roles). Each batch element
draws a slot in a balanced cycle; a style slot's target is the teacher's output for that slot
on the same crop, the identity slot's target is the photo itself (what the slot is for; the
teacher's CPU-trained identity slot gives the photo back only to ~20 dB). The loss is the mean
absolute pixel error, which keeps edges sharper than squared error where the student cannot
match exactly, plus the trainer's saturation penalty when asked.
"""

from __future__ import annotations

import argparse
from typing import Any, ClassVar

import torch
from torch import nn

from model_zoo.manifest import ModelEntry, StyleSlot, lineage_of
from model_zoo.nets import MultiStyleNet
from training.settings import TrainSettings
from training.tasks.multistyle import MultiStyleTask
from training.vgg import VGG16Features


class DistillTask(MultiStyleTask):
    """``python -m training distill --teacher multistyle --name NAME --channels ...``."""

    name: ClassVar[str] = "distill"
    help: ClassVar[str] = "train a cheaper multi-style net to reproduce a trained one's outputs"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--teacher", required=True, help="the multi-style net to copy")
        parser.add_argument(
            "--teacher-zoo",
            default=None,
            help="zoo holding the teacher (default: $MODEL_ZOO_DIR or the shipped one); the "
            "student goes to --zoo, which must not offer the same style names",
        )
        cls.add_architecture_arguments(
            parser, channels=(8, 32, 32), outer_kernel=5, decoder_channels=(16, 8)
        )
        # Tables at 10x: each row learns only from its share of a batch (at 1 the slots
        # stayed alike for ~1,000 steps).
        cls.add_penalty_arguments(parser, conditional_lr_scale=10.0)

    @classmethod
    def settings_from_values(cls, values: dict[str, Any]) -> TrainSettings:
        values.setdefault("style_images", [])
        return super().settings_from_values(values)

    # ------------------------------------------------------------------ the teacher

    def _teacher(self) -> tuple[MultiStyleNet, ModelEntry]:
        if not hasattr(self, "_teacher_model"):
            from model_zoo import registry

            teacher = self.settings.teacher
            assert teacher is not None
            net, entry = registry.load_model(teacher, root=self.settings.teacher_zoo)
            if not isinstance(net, MultiStyleNet):
                raise ValueError(f"--teacher {teacher} is not a multi-style net")
            net = net.float().eval().requires_grad_(False)
            # The student's batches are channels_last (training.loop); so is the teacher.
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            self._teacher_model = (net, entry)
        return self._teacher_model

    def slots(self) -> list[StyleSlot]:
        return [slot.model_copy() for slot in self._teacher()[1].styles]

    def initial_lineage(self) -> list[dict[str, Any]]:
        """The teacher's runs: the student's function comes from them."""
        return lineage_of(self._teacher()[1])

    # ------------------------------------------------------------------ objective

    @property
    def needs_vgg(self) -> bool:
        return False

    def prepare(self, vgg: VGG16Features | None, device: torch.device) -> None:
        teacher, _ = self._teacher()
        self.teacher = teacher.to(device)
        self.prepare_slots(self.slots(), device)

    def loss(self, net: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        slots, weights = self.next_slots(net, batch)
        with torch.no_grad():
            photo = batch.float()
            target = self.teacher(photo, weights)
            identity = self.is_identity[slots].view(-1, 1, 1, 1)
            target = torch.where(identity, photo, target)
        output = net(batch, weights)
        terms = {"pixel": (output.float() - target).abs().mean()}
        if s.saturation_penalty:
            terms["saturation"] = self.saturation_term()
        total = sum(terms.values())
        return total, {k: float(v.detach()) for k, v in terms.items()}  # type: ignore[return-value]

    def phase(self) -> dict[str, Any]:
        s = self.settings
        return (
            {
                "lr": s.lr,
                "conditional_lr_scale": s.conditional_lr_scale,
                "saturation_penalty": s.saturation_penalty,
                "saturation_limit": s.saturation_limit,
            }
            | ({"warmup": s.warmup} if s.warmup else {})
            | (
                {"lr_milestones": list(s.lr_milestones), "lr_gamma": s.lr_gamma}
                if s.lr_milestones
                else {}
            )
            | ({"ema_decay": s.ema_decay} if s.ema_decay else {})
        )

    def manifest_fields(self) -> dict[str, Any]:
        return {"loss": "distilled", "styles": self.slots()}

"""Many styles in one net (Dumoulin, Shlens, Kudlur 2017): conditional instance norm.

Every batch element draws a style slot (a balanced, shuffled cycle, so each style gets the same
share of the photos); the style Gram targets of every style are computed once. Slot 0 can be an
*identity* slot trained to reproduce the photo (pixel MSE + the content term), which gives the
service a ``strength`` control: strength s mixes the style's conditional parameters with the
identity's, ``s * style + (1 - s) * identity``, the same interpolation Dumoulin et al. use
between styles.

``python -m training add-style`` is the paper's cheap path for a new style: the trained net
gains one slot and only that slot's scale and shift (2 x 3 per normalised channel... a few
thousand numbers) are trained; every convolution stays as it is.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from model_zoo.config import MultiStyleNetConfig
from model_zoo.manifest import ModelEntry, StyleSlot
from model_zoo.nets import ConditionalInstanceNorm2d, MultiStyleNet
from training.losses import feature_loss, pixel_loss, style_loss, tv_loss
from training.settings import TrainSettings
from training.tasks.base import TrainingTask
from training.tasks.style import style_grams
from training.vgg import CONTENT_LAYER, STYLE_LAYERS, VGG16Features

IDENTITY = "identity"


def parse_style_image(item: str) -> tuple[str, str]:
    """``name=path`` or just ``path`` (the name is then the file's stem)."""
    name, sep, path = item.partition("=")
    if not sep:
        path, name = item, Path(item).stem
    return name, path


@dataclass
class MultiStyleSettings(TrainSettings):
    style_images: list[str] = field(default_factory=list)
    """``name=path`` per style, in slot order (after the identity slot)."""
    style_size: int | None = 512
    style_weight: float = 3e5
    style_scales: dict[str, float] = field(default_factory=dict)
    """Per-style multipliers of ``style_weight`` (a style whose Grams are large needs less)."""
    identity: bool = True
    identity_weight: float = 1e5
    """Pixel MSE weight of identity samples (content-weight units)."""
    channels: tuple[int, int, int] = (16, 32, 64)
    num_residual: int = 5
    outer_kernel: int = 9
    decoder_channels: tuple[int, int] | None = None
    output: str = "sigmoid"
    saturation_penalty: float = 0.0
    """Weight of ``mean(relu(|logit| - saturation_limit)^2)`` on the pre-squash output: a
    saturated sigmoid has no gradient, so a blown-out blob (a droplet) could never be pulled
    back; the penalty keeps a gradient on every pixel that leaves the useful range."""
    saturation_limit: float = 4.0
    """Logit magnitude allowed for free (sigmoid(4) = 0.982, within 5 levels of the limits)."""
    conditional_lr_scale: float = 1.0
    """Learning-rate multiplier of the per-style scale and shift tables. Each style's rows get
    a gradient only from its own share of a batch, and Adam moves a parameter by about the
    learning rate per step whatever its gradient, so at lr 1e-3 a scale needs ~1,000 steps to
    travel from 1 to 0: on a CPU budget the styles stay alike for that long (seen: after 1,000
    iterations all seven slots painted one palette)."""
    base: str | None = None
    """add-style only: the trained multi-style net that gains a slot."""
    teacher: str | None = None
    """distill only: the trained multi-style net whose outputs the student learns."""
    teacher_zoo: str | None = None
    """distill only: the zoo that holds the teacher (None: the default zoo)."""


class MultiStyleTask(TrainingTask[MultiStyleSettings]):
    name: ClassVar[str] = "multistyle"
    kind: ClassVar[str] = "style"
    settings_type: ClassVar[type[TrainSettings]] = MultiStyleSettings
    default_image_size: ClassVar[int] = 256
    help: ClassVar[str] = "train one net on many styles (conditional instance norm)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        cls.add_style_arguments(parser)
        parser.add_argument(
            "--no-identity", dest="identity", action="store_false", help="no identity slot"
        )
        parser.add_argument("--identity-weight", type=float, default=1e5)
        cls.add_architecture_arguments(parser)

    @classmethod
    def add_architecture_arguments(
        cls,
        parser: argparse.ArgumentParser,
        channels: tuple[int, int, int] = (16, 32, 64),
        outer_kernel: int = 9,
        decoder_channels: tuple[int, int] | None = None,
    ) -> None:
        """The net's shape (``MultiStyleNetConfig``); a distilled student has other defaults."""
        parser.add_argument("--channels", type=int, nargs=3, default=list(channels))
        parser.add_argument("--num-residual", type=int, default=5)
        parser.add_argument("--outer-kernel", type=int, default=outer_kernel, choices=[3, 5, 7, 9])
        parser.add_argument(
            "--decoder-channels",
            type=int,
            nargs=2,
            default=list(decoder_channels) if decoder_channels else None,
            help="widths of the half- and full-resolution upsampling convs (default: the "
            "encoder's mirror)",
        )
        parser.add_argument("--output", default="sigmoid", choices=["sigmoid", "tanh"])

    @classmethod
    def add_style_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """What defines the styles and the loss (the architecture options are separate: a new
        style added to a trained net keeps the net's)."""
        parser.add_argument(
            "--style-images",
            nargs="+",
            required=True,
            metavar="NAME=PATH",
            help="one per style, in slot order (NAME defaults to the file's stem)",
        )
        parser.add_argument("--style-size", type=int, default=512, help="longer side (px)")
        parser.add_argument("--content-weight", type=float, default=1e5)
        parser.add_argument("--style-weight", type=float, default=3e5)
        parser.add_argument(
            "--style-scale",
            nargs="*",
            default=[],
            metavar="NAME=X",
            help="per-style multiplier of --style-weight",
        )
        cls.add_penalty_arguments(parser)

    @classmethod
    def add_penalty_arguments(
        cls, parser: argparse.ArgumentParser, conditional_lr_scale: float = 1.0
    ) -> None:
        """The saturation penalty and the tables' learning rate, which every multi-style
        objective (perceptual or distilled) shares."""
        parser.add_argument(
            "--saturation-penalty",
            type=float,
            default=0.0,
            help="weight of the penalty on pre-squash logits beyond --saturation-limit",
        )
        parser.add_argument("--saturation-limit", type=float, default=4.0)
        parser.add_argument(
            "--conditional-lr-scale",
            type=float,
            default=conditional_lr_scale,
            help="learning-rate multiplier of the per-style scale/shift tables",
        )

    @classmethod
    def settings_from_values(cls, values: dict[str, Any]) -> TrainSettings:
        scales = {}
        for item in values.pop("style_scale", None) or []:
            name, _, value = item.partition("=")
            scales[name] = float(value)
        values["style_scales"] = scales
        for key in ("channels", "decoder_channels"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return super().settings_from_values(values)

    # ------------------------------------------------------------------ slots

    def slots(self) -> list[StyleSlot]:
        s = self.settings
        slots = [StyleSlot(name=IDENTITY, index=0, role="identity")] if s.identity else []
        for name, path in map(parse_style_image, s.style_images):
            slots.append(self.new_slot(name, path, len(slots)))
        return slots

    def start_mismatch(self, entry: ModelEntry) -> str | None:
        """Row i of the tables is slot i's style: a start whose slots differ in name or order
        would train every style from another's row."""
        ours = [(slot.name, slot.role) for slot in self.slots()]
        theirs = [(slot.name, slot.role) for slot in entry.styles]
        if ours != theirs:
            return (
                f"its slots {[n for n, _ in theirs]} differ from this run's "
                f"{[n for n, _ in ours]} (same names, same order)"
            )
        return super().start_mismatch(entry)

    def new_slot(self, name: str, path: str, index: int) -> StyleSlot:
        """The slot of a style trained by this run (its image and weight from the settings)."""
        s = self.settings
        weight = s.style_weight * s.style_scales.get(name, 1.0)
        return StyleSlot(name=name, index=index, style_image=path, style_weight=weight)

    def architecture(self) -> MultiStyleNetConfig:
        s = self.settings
        return MultiStyleNetConfig(
            num_styles=len(self.slots()),
            channels=s.channels,
            num_residual=s.num_residual,
            outer_kernel=s.outer_kernel,  # type: ignore[arg-type]
            decoder_channels=s.decoder_channels,
            upsample=s.upsample,  # type: ignore[arg-type]
            output=s.output,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ objective

    def prepare(self, vgg: VGG16Features | None, device: torch.device) -> None:
        assert vgg is not None
        self.vgg = vgg
        slots = self.slots()
        self.style_slots = [slot.index for slot in slots if slot.role == "style"]
        # Per-slot Gram targets stacked per layer (identity slots get zeros, weight 0).
        grams: dict[str, list[torch.Tensor]] = {k: [] for k in STYLE_LAYERS}
        weights = []
        for slot in slots:
            if slot.role == "identity":
                for k in STYLE_LAYERS:
                    channels = self._layer_channels(k)
                    grams[k].append(torch.zeros(1, channels, channels, device=device))
                weights.append(0.0)
            else:
                one = style_grams(slot.style_image, self.settings.style_size, vgg, device)
                for k in STYLE_LAYERS:
                    grams[k].append(one[k])
                weights.append(float(slot.style_weight or 0.0))
        self.grams = {k: torch.cat(v) for k, v in grams.items()}
        self.slot_style_weight = torch.tensor(weights, device=device)
        self.prepare_slots(slots, device)

    def prepare_slots(self, slots: list[StyleSlot], device: torch.device) -> None:
        """What drawing slots needs: their count, which are identity, a seeded shuffled cycle."""
        self.num_slots = len(slots)
        self.is_identity = torch.tensor([s.role == "identity" for s in slots], device=device)
        self._cycle: list[int] = []
        self._generator = torch.Generator().manual_seed(self.settings.seed)

    @staticmethod
    def _layer_channels(layer: str) -> int:
        return {"relu1_2": 64, "relu2_2": 128, "relu3_3": 256, "relu4_3": 512}[layer]

    def draw_slots(self, batch: int) -> list[int]:
        """The next ``batch`` slots of a shuffled cycle over every slot: each style (and the
        identity) gets the same share of photos, in a different order every round."""
        while len(self._cycle) < batch:
            order = torch.randperm(self.num_slots, generator=self._generator).tolist()
            self._cycle += order
        drawn, self._cycle = self._cycle[:batch], self._cycle[batch:]
        return drawn

    def _watch_logits(self, net: nn.Module) -> None:
        """Keep the last layer's pre-squash output of each forward (for the saturation term)."""
        if getattr(self, "_watched", None) is net:
            return
        assert isinstance(net, MultiStyleNet)
        net.decoder[-1].register_forward_hook(
            lambda module, args, out: setattr(self, "_logits", out)
        )
        self._watched = net

    def saturation_term(self) -> torch.Tensor:
        """The weighted penalty on the last forward's pre-squash logits beyond the limit
        (``next_slots`` watches them)."""
        s = self.settings
        # Consumed: kept, the logits would hold the step's autograd graph (and its memory)
        # until the next forward.
        logits, self._logits = self._logits, None
        excess = torch.relu(logits.float().abs() - s.saturation_limit)
        return s.saturation_penalty * excess.pow(2).mean()

    def next_slots(self, net: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's slots and their one-hot style rows; watches the logits when the
        saturation penalty is on."""
        if self.settings.saturation_penalty:
            self._watch_logits(net)
        slots = torch.tensor(self.draw_slots(batch.shape[0]), device=batch.device)
        return slots, torch.nn.functional.one_hot(slots, self.num_slots).float()

    def loss(self, net: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        slots, weights = self.next_slots(net, batch)
        output = net(batch, weights)
        out_feats = self.vgg(output)
        with torch.no_grad():
            target = self.vgg.content(batch)
        content = s.content_weight * feature_loss(out_feats[CONTENT_LAYER], target)
        per_sample = self.slot_style_weight[slots]
        targets = {k: v[slots] for k, v in self.grams.items()}
        style = style_loss(out_feats, targets, sample_weights=per_sample)
        identity_mask = self.is_identity[slots]
        terms = {"content": content, "style": style, "tv": s.tv_weight * tv_loss(output)}
        if s.saturation_penalty:
            terms["saturation"] = self.saturation_term()
        if bool(self.is_identity.any()):  # every step logs the same terms
            terms["identity"] = (
                s.identity_weight
                * pixel_loss(output[identity_mask], batch[identity_mask])
                * identity_mask.float().mean()
                if bool(identity_mask.any())
                else torch.zeros((), device=batch.device)
            )
        total = sum(terms.values())
        return total, {k: float(v.detach()) for k, v in terms.items()}  # type: ignore[return-value]

    def phase(self) -> dict[str, Any]:
        s = self.settings
        return (
            super().phase()
            | {
                "style_weight": s.style_weight,
                "style_scales": dict(s.style_scales),
                "identity_weight": s.identity_weight,
                "saturation_penalty": s.saturation_penalty,
                "saturation_limit": s.saturation_limit,
            }
            | (
                {"conditional_lr_scale": s.conditional_lr_scale}
                if s.conditional_lr_scale != 1
                else {}
            )
        )

    def param_groups(self, net: nn.Module) -> list[dict[str, Any]]:
        trainable = {id(p) for p in self.trainable_parameters(net)}
        tables = [
            p
            for m in net.modules()
            if isinstance(m, ConditionalInstanceNorm2d)
            for p in (m.scale, m.shift)
            if id(p) in trainable
        ]
        table_ids = {id(p) for p in tables}
        shared = [p for p in net.parameters() if id(p) in trainable and id(p) not in table_ids]
        groups = [{"params": tables, "lr_scale": self.settings.conditional_lr_scale}]
        return ([{"params": shared, "lr_scale": 1.0}] if shared else []) + groups

    # ------------------------------------------------------------------ reporting

    def sample_row(self, net: nn.Module, photo: torch.Tensor) -> list[torch.Tensor]:
        """photo | every slot (identity first when there is one)."""
        assert isinstance(net, MultiStyleNet)
        return [photo] + [net(photo, net.one_hot(i)) for i in range(net.config.num_styles)]

    def sample_sizes(self) -> Sequence[int]:
        return (self.settings.image_size, 2 * self.settings.image_size)

    def manifest_fields(self) -> dict[str, Any]:
        return {"loss": "perceptual", "styles": self.slots()}


class AddStyleTask(MultiStyleTask):
    """A new style for a trained multi-style net: only the new slot's scale and shift train.

    ``--base NAME`` is the zoo's multi-style net; ``--style-images`` names the new style(s).
    The exported model is the base net with the new slots appended, under ``--name`` (the same
    name replaces the base; a resumed run then finds its styles already appended and trains
    those slots again), with the base run in its lineage.
    """

    name: ClassVar[str] = "add-style"
    help: ClassVar[str] = "add a style to a trained multi-style net (trains only its scale/shift)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        cls.add_style_arguments(parser)
        parser.add_argument("--base", required=True, help="the zoo's multi-style net to extend")

    @classmethod
    def settings_from_values(cls, values: dict[str, Any]) -> TrainSettings:
        settings = super().settings_from_values(values)
        assert isinstance(settings, MultiStyleSettings)
        # The architecture is the base net's; record it as such, not as the defaults.
        base = cls(settings)._base()[1].arch
        assert isinstance(base, MultiStyleNetConfig)
        settings.channels, settings.num_residual = base.channels, base.num_residual
        settings.outer_kernel, settings.output = base.outer_kernel, base.output
        settings.decoder_channels = base.decoder_channels
        settings.identity = any(s.role == "identity" for s in cls(settings)._base()[1].styles)
        return settings

    def _base(self) -> tuple[MultiStyleNet, ModelEntry]:
        if not hasattr(self, "_base_model"):
            from model_zoo import registry

            assert self.settings.base is not None
            net, entry = registry.load_model(self.settings.base, root=self.settings.zoo)
            if not isinstance(net, MultiStyleNet):
                raise ValueError(f"--base {self.settings.base} is not a multi-style net")
            self._base_model = (net, entry)
        return self._base_model

    def slots(self) -> list[StyleSlot]:
        _, entry = self._base()
        slots = [slot.model_copy() for slot in entry.styles]
        s = self.settings
        self.new_indices: list[int] = []
        for name, path in map(parse_style_image, s.style_images):
            same = next((slot for slot in slots if slot.name == name), None)
            if same is not None:
                if same.style_image != path:
                    raise ValueError(f"{entry.name} already has a style named {name!r}")
                self.new_indices.append(same.index)  # appended by an earlier run of this one
                continue
            slots.append(self.new_slot(name, path, len(slots)))
            self.new_indices.append(len(slots) - 1)
        return slots

    def architecture(self) -> MultiStyleNetConfig:
        _, entry = self._base()
        assert isinstance(entry.arch, MultiStyleNetConfig)
        return entry.arch.model_copy(update={"num_styles": len(self.slots())})

    def initial_lineage(self) -> list[dict[str, Any]]:
        from model_zoo.manifest import lineage_of

        return lineage_of(self._base()[1])

    def build_net(self) -> nn.Module:
        """The base net with grown tables; new rows start from the mean of the trained styles
        (a neutral start, not any one style's colours)."""
        base, entry = self._base()
        net = MultiStyleNet(self.architecture())
        grown = net.state_dict()
        styles = [slot.index for slot in entry.styles if slot.role == "style"]
        for key, value in base.state_dict().items():
            rows = value.shape[0] if value.ndim else 0
            grown[key][:rows] = value
            if value.shape != grown[key].shape:
                grown[key][rows:] = value[styles].mean(dim=0, keepdim=True)
        net.load_state_dict(grown)
        return net

    def trainable_parameters(self, net: nn.Module) -> Iterable[nn.Parameter]:
        """Only the conditional tables, and in them only the new rows (a gradient mask)."""
        params: list[nn.Parameter] = []
        mask = torch.zeros(self.architecture().num_styles, 1)
        mask[self.new_indices] = 1.0
        for module in net.modules():
            if isinstance(module, ConditionalInstanceNorm2d):
                for param in (module.scale, module.shift):
                    param.register_hook(lambda grad, m=mask: grad * m.to(grad.device))
                    params.append(param)
        trainable = {id(p) for p in params}
        for param in net.parameters():
            param.requires_grad_(id(param) in trainable)
        return params

    def draw_slots(self, batch: int) -> list[int]:
        """Only the new styles: the others are not trained (their rows get no gradient)."""
        while len(self._cycle) < batch:
            order = torch.randperm(len(self.new_indices), generator=self._generator).tolist()
            self._cycle += [self.new_indices[i] for i in order]
        drawn, self._cycle = self._cycle[:batch], self._cycle[batch:]
        return drawn

"""The zoo's manifest: what each shipped model is, how it was trained and how good it is.

Torch-free so the API (which lists styles) need not import torch. Loading weights lives in
``model_zoo.registry``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_zoo.config import ArchConfig, MultiStyleNetConfig

MANIFEST_NAME = "manifest.json"
WEIGHTS_DIR = "weights"
DEFAULT_ZOO_DIR = Path(__file__).resolve().parent


def zoo_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The zoo folder: an explicit path, else ``$MODEL_ZOO_DIR``, else this package's folder."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("MODEL_ZOO_DIR")
    return Path(env) if env else DEFAULT_ZOO_DIR


NAME_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,63}$"


IDENTITY_MIN_PSNR_DB = 25.0
"""An identity slot below this (PSNR against the photo) is not used for ``strength``."""


class StyleSlot(BaseModel):
    """One style of a multi-style net: the name users ask for and its row of the conditional
    instance-norm tables, with what it was trained on and how good it is."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    index: int = Field(ge=0)
    role: Literal["style", "identity"] = "style"
    """``identity`` reproduces the photo; ``strength`` interpolates towards it."""
    public: bool = True
    """False keeps the slot in the net but does not offer it (e.g. while an older single-style
    net of that name still ships because it is better)."""
    style_image: str = ""
    style_weight: float | None = None
    description: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)


class ModelEntry(BaseModel):
    """One model of the zoo. ``weights`` is relative to the zoo folder."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["style", "sr"]
    factor: int | None = None
    loss: str | None = None
    description: str = ""
    arch: ArchConfig
    weights: str
    sha256: str
    num_parameters: int = 0
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    iterations: int = 0
    final_losses: dict[str, float] = Field(default_factory=dict)
    hardware: str = ""
    wall_time_s: float = 0.0
    created: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    styles: list[StyleSlot] = Field(default_factory=list)
    """Multi-style nets only: every slot of the conditional tables."""

    @model_validator(mode="after")
    def _slots_fit_the_net(self) -> ModelEntry:
        if not isinstance(self.arch, MultiStyleNetConfig):
            if self.styles:
                raise ValueError(f"{self.name}: only multi-style nets have style slots")
            return self
        indices = [slot.index for slot in self.styles]
        names = [slot.name for slot in self.styles]
        if len(set(indices)) != len(indices) or len(set(names)) != len(names):
            raise ValueError(f"{self.name}: style slots repeat an index or a name")
        if any(i >= self.arch.num_styles for i in indices):
            raise ValueError(
                f"{self.name}: a style slot is beyond the net's {self.arch.num_styles}"
            )
        if sum(slot.role == "identity" for slot in self.styles) > 1:
            raise ValueError(f"{self.name}: more than one identity slot")
        return self

    @property
    def identity_index(self) -> int | None:
        return next((s.index for s in self.styles if s.role == "identity"), None)

    @property
    def strength_identity_index(self) -> int | None:
        """The identity slot, if ``strength`` may use it: unless its measured fidelity (PSNR of
        its output against the photo, ``metrics["fidelity"]``, written by
        ``training.promote``) is below ``IDENTITY_MIN_PSNR_DB``.

        Why: interpolating the conditional parameters towards an identity slot only fades the
        style if that slot gives back the photo. The CPU-trained net's identity slot read
        13-19 dB: greyed, darkened photos, so ``strength=0.25`` returned a grey picture. Then a
        pixel blend with the photo is the honest strength, and it is used instead."""
        for slot in self.styles:
            if slot.role == "identity":
                psnr = slot.metrics.get("fidelity", {}).get("psnr_db")
                return slot.index if psnr is None or psnr >= IDENTITY_MIN_PSNR_DB else None
        return None


@dataclass(frozen=True)
class StyleRef:
    """Where a public style name lives: a single-style net, or a slot of a multi-style net."""

    style: str
    model: str
    index: int | None
    """The slot in the conditional tables; None for a single-style net."""
    identity: int | None
    """The net's identity slot (what ``strength`` < 1 mixes in); None if it has none or it is
    not faithful enough (``ModelEntry.strength_identity_index``)."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    models: list[ModelEntry] = Field(default_factory=list)
    default_upscalers: dict[int, str] = Field(default_factory=dict)
    """The model ``/upscale?factor=F`` serves when the request names none, by factor; a factor
    not listed serves ``xF``. Written by ``python -m evaluation sr`` from what it measured
    (``evaluation.sr.choose_default_upscalers``): the name ``x8`` says how a net was trained
    (feature loss), not that it is the better x8, and a user who asks for x8 wants the better
    one."""

    @model_validator(mode="after")
    def _default_upscalers_exist(self) -> Manifest:
        for factor, name in self.default_upscalers.items():
            entry = next((m for m in self.models if m.name == name), None)
            if entry is None or entry.kind != "sr" or entry.factor != factor:
                raise ValueError(f"default x{factor} upscaler {name!r} is not an x{factor} model")
        return self

    def default_upscaler(self, factor: int) -> str:
        """The model name ``/upscale?factor=F`` serves when none is named."""
        return self.default_upscalers.get(factor, f"x{factor}")

    def is_default_upscaler(self, entry: ModelEntry) -> bool:
        """Whether ``entry`` is what its factor serves when a request names no model."""
        return entry.kind == "sr" and entry.name == self.default_upscaler(entry.factor or 0)

    @model_validator(mode="after")
    def _style_names_are_unique(self) -> Manifest:
        seen: dict[str, str] = {}
        for ref in self._style_refs():
            if ref.style in seen:
                raise ValueError(
                    f"style {ref.style!r} is offered by both {seen[ref.style]!r} and "
                    f"{ref.model!r}; make one of the slots private (public: false)"
                )
            seen[ref.style] = ref.model
        return self

    def _style_refs(self) -> list[StyleRef]:
        refs = []
        for entry in self.models:
            if entry.kind != "style":
                continue
            if not entry.styles:
                refs.append(StyleRef(entry.name, entry.name, None, None))
                continue
            refs += [
                StyleRef(slot.name, entry.name, slot.index, entry.strength_identity_index)
                for slot in entry.styles
                if slot.public and slot.role == "style"
            ]
        return refs

    def styles(self) -> dict[str, StyleRef]:
        """Every style users can ask for, by name (single-style nets and public slots)."""
        return {ref.style: ref for ref in self._style_refs()}

    def get(self, name: str) -> ModelEntry:
        for entry in self.models:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def names(self, kind: str | None = None) -> list[str]:
        return [m.name for m in self.models if kind is None or m.kind == kind]

    def upsert(self, entry: ModelEntry) -> None:
        self.models = [m for m in self.models if m.name != entry.name] + [entry]
        self.models.sort(key=lambda m: (m.kind, m.name))
        self.default_upscalers = {
            factor: name
            for factor, name in self.default_upscalers.items()
            if name != entry.name or (entry.kind == "sr" and entry.factor == factor)
        }


# What a lineage record keeps of each earlier run: enough to tell how the weights came to be.
_LINEAGE_SETTINGS = (
    "init_from", "loss", "lr", "content_weight", "style_weight", "tv_weight", "pixel_weight",
    "image_size", "batch_size", "precision", "phases",
)  # fmt: skip


def lineage_of(entry: ModelEntry) -> list[dict[str, Any]]:
    """The runs behind ``entry``, oldest first and ``entry`` itself last.

    A run started with ``--init-from`` overwrites nothing of its parent's history: the parent's
    own lineage is carried over, so a model fine-tuned in stages (or from another style) still
    records every iteration, machine and hour that went into its weights, even after the
    parent's zoo entry is replaced (``--init-from x4 --name x4``).
    """
    run = {
        "name": entry.name,
        "sha256": entry.sha256,
        "iterations": entry.iterations,
        "hardware": entry.hardware,
        "wall_time_s": entry.wall_time_s,
        "created": entry.created,
    } | {k: entry.training[k] for k in _LINEAGE_SETTINGS if k in entry.training}
    return [*entry.training.get("lineage", []), run]


def read_manifest(root: str | os.PathLike[str] | None = None) -> Manifest:
    path = zoo_dir(root) / MANIFEST_NAME
    if not path.exists():
        return Manifest()
    return Manifest.model_validate_json(path.read_text())


def write_manifest(manifest: Manifest, root: str | os.PathLike[str] | None = None) -> Path:
    """Atomic replace, so a reader (the API, another trainer) never sees a half-written file."""
    folder = zoo_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    payload = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        handle.write(payload)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; containers read the zoo as another user
    os.replace(tmp, path)
    return path

"""The zoo's manifest: what each shipped model is, how it was trained and how good it is.

Torch-free so the API (which lists styles) need not import torch. Loading weights lives in
``model_zoo.registry``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model_zoo.config import ArchConfig

MANIFEST_NAME = "manifest.json"
WEIGHTS_DIR = "weights"
DEFAULT_ZOO_DIR = Path(__file__).resolve().parent


def zoo_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The zoo folder: an explicit path, else ``$MODEL_ZOO_DIR``, else this package's folder."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("MODEL_ZOO_DIR")
    return Path(env) if env else DEFAULT_ZOO_DIR


class ModelEntry(BaseModel):
    """One model of the zoo. ``weights`` is relative to the zoo folder."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$")
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


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    models: list[ModelEntry] = Field(default_factory=list)

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

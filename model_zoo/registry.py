"""Save and load zoo models: safetensors weights + a manifest entry, never pickle.

A loaded model is rebuilt from the manifest's architecture config and its weights are checked
against the recorded sha256, so a corrupted or swapped file is refused instead of served.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model_zoo.config import ArchConfig
from model_zoo.manifest import (
    WEIGHTS_DIR,
    Manifest,
    ModelEntry,
    read_manifest,
    write_manifest,
    zoo_dir,
)
from model_zoo.nets import build_net, count_parameters


class ModelNotFoundError(KeyError):
    """The manifest has no model of that name."""

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(name)
        self.name, self.available = name, available

    def __str__(self) -> str:
        return f"no model named {self.name!r}; available: {', '.join(self.available) or 'none'}"


class WeightsIntegrityError(RuntimeError):
    """The weights file is missing or does not match the manifest's sha256."""


def file_metadata(**fields: str) -> dict[str, str]:
    """Safetensors header metadata under one key. safetensors writes a metadata map's keys in a
    random order (safetensors/safetensors#584, open), so two saves of the same weights with two
    keys differ in their bytes, and the manifest, which names weights by sha256, would record
    the same net under two hashes."""
    return {"model": json.dumps(fields, sort_keys=True)}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_models(root: str | os.PathLike[str] | None = None) -> list[ModelEntry]:
    return list(read_manifest(root).models)


def get_entry(name: str, root: str | os.PathLike[str] | None = None) -> ModelEntry:
    manifest = read_manifest(root)
    try:
        return manifest.get(name)
    except KeyError:
        raise ModelNotFoundError(name, manifest.names()) from None


def check_entry(
    *,
    name: str,
    kind: str,
    arch: ArchConfig,
    root: str | os.PathLike[str] | None = None,
    **entry_fields: Any,
) -> None:
    """Raise now what ``save_model`` would refuse later (a style name another model offers, a
    field out of range): a trainer calls this before hours of training, not after them."""
    entry = ModelEntry(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        arch=arch,
        weights=f"{WEIGHTS_DIR}/{name}.safetensors",
        sha256="0" * 64,
        num_parameters=0,
        **entry_fields,
    )
    manifest = read_manifest(zoo_dir(root))
    manifest.upsert(entry)
    Manifest.model_validate(manifest.model_dump())


def save_model(
    net: nn.Module,
    *,
    name: str,
    kind: str,
    arch: ArchConfig,
    root: str | os.PathLike[str] | None = None,
    **entry_fields: Any,
) -> ModelEntry:
    """Write ``weights/<name>.safetensors`` (fp32, contiguous) and upsert the manifest entry.

    The new manifest is validated before anything is replaced: an entry that would make the
    zoo unreadable (a style name offered twice) is refused and the zoo stays as it was.
    """
    folder = zoo_dir(root)
    (folder / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
    relative = f"{WEIGHTS_DIR}/{name}.safetensors"
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    # BatchNorm's num_batches_tracked is an int counter; keep its dtype.
    for key, value in net.state_dict().items():
        if not value.is_floating_point():
            tensors[key] = value.detach().contiguous().cpu()
    tmp = folder / f"{relative}.tmp"
    save_file(tensors, str(tmp), metadata=file_metadata(name=name, kind=kind))
    os.chmod(tmp, 0o644)  # readable by the non-root service users that mount the zoo
    try:
        entry = ModelEntry(
            name=name,
            kind=kind,  # type: ignore[arg-type]
            arch=arch,
            weights=relative,
            sha256=sha256_file(tmp),
            num_parameters=count_parameters(net),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            **entry_fields,
        )
        # New weights start with no metrics: what was measured on the entry they replace (its
        # evaluation, its fp16 storage record) describes other weights.
        manifest = read_manifest(folder)
        manifest.upsert(entry)
        manifest = Manifest.model_validate(manifest.model_dump())
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, folder / relative)
    write_manifest(manifest, folder)
    return entry


def update_metrics(
    name: str,
    metrics: dict[str, Any],
    root: str | os.PathLike[str] | None = None,
    style: str | None = None,
) -> ModelEntry:
    """Merge evaluation results into a model's ``metrics`` field, or into the ``metrics`` of
    its slot ``style`` (a multi-style net measures each style on its own)."""
    manifest = read_manifest(root)
    try:
        entry = manifest.get(name)
    except KeyError:
        raise ModelNotFoundError(name, manifest.names()) from None
    if style is None:
        entry.metrics = {**entry.metrics, **metrics}
    else:
        slot = next((s for s in entry.styles if s.name == style), None)
        if slot is None:
            raise ModelNotFoundError(style, [s.name for s in entry.styles])
        slot.metrics = {**slot.metrics, **metrics}
    write_manifest(manifest, root)
    return entry


def load_model(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, ModelEntry]:
    """Rebuild ``name`` from the manifest, verify its sha256, load weights; eval mode."""
    folder = zoo_dir(root)
    entry = get_entry(name, folder)
    path = folder / entry.weights
    if not path.exists():
        raise WeightsIntegrityError(f"weights file {path} for model {name!r} is missing")
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise WeightsIntegrityError(
            f"weights of {name!r} have sha256 {actual}, manifest says {entry.sha256}"
        )
    net = build_net(entry.arch)
    # Weights stored in fp16 (``training.storage``, checked >= 40 dB from fp32 when written)
    # are upcast here: callers compute in fp32 or in the precision they ask for, never in the
    # storage dtype.
    state = load_file(str(path), device="cpu")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state, strict=True)
    return net.to(device).eval(), entry

"""Which models the API offers: the zoo manifest, re-read when the file changes.

Torch-free (``model_zoo.manifest`` only). The manifest is cached by modification time and size,
so a model added by the trainer shows up without restarting the API and a request never parses
the file twice for nothing.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

from model_zoo.manifest import MANIFEST_NAME, Manifest, ModelEntry, read_manifest, zoo_dir
from model_zoo.styles import StyleChoice, resolve_style

THUMBNAILS_DIR = "thumbnails"


def thumbnail_path(root: str | os.PathLike[str], style: str) -> Path:
    """Where a style's gallery thumbnail lives: ``<zoo>/thumbnails/<style>.jpg``.

    Defined here (torch-free) so the API that serves the file and
    ``scripts/make_thumbnails.py`` that writes it agree on one layout.
    """
    return Path(root) / THUMBNAILS_DIR / f"{style}.jpg"


class UnknownModelError(LookupError):
    def __init__(self, name: str, kind: str, available: list[str]) -> None:
        super().__init__(f"unknown {kind} model {name!r}")
        self.name = name
        self.kind = kind
        self.available = available


class ModelMismatchError(ValueError):
    """A model exists but cannot serve the request (e.g. an x4 model asked for factor 8)."""


class ManifestError(RuntimeError):
    """The manifest exists but cannot be read; the API cannot say which models exist."""


class ModelCatalog:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = zoo_dir(root)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._manifest = Manifest()

    def manifest(self) -> Manifest:
        path = Path(self.root) / MANIFEST_NAME
        try:
            stat = path.stat()
            stamp: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or stamp is None:
                try:
                    self._manifest = read_manifest(self.root)
                except Exception as exc:  # invalid JSON or schema: say so instead of a 500
                    raise ManifestError(f"model manifest {path} is unreadable: {exc}") from exc
                self._stamp = stamp
            return self._manifest

    def style(self, style: str | None, mix: str | None = None) -> StyleChoice:
        """The model and slot weights for ``style`` or ``mix``; raises
        ``model_zoo.styles.UnknownStyleError`` / ``StyleMixError``."""
        return resolve_style(self.manifest(), style, mix)

    def kind_of(self, name: str) -> str | None:
        """The kind of the model called ``name`` (to tell "no such style" from "that is an
        upscaler"), or None."""
        return next((m.kind for m in self.manifest().models if m.name == name), None)

    def upscaler(self, factor: int, name: str | None = None) -> ModelEntry:
        """The SR model for ``factor``: ``name`` if given, else the zoo's default for it
        (``Manifest.default_upscaler``: the measured best, else ``x{factor}``)."""
        manifest = self.manifest()  # one snapshot: the default and its entry agree
        name = name or manifest.default_upscaler(factor)
        entry = next((m for m in manifest.models if m.name == name and m.kind == "sr"), None)
        if entry is None:  # offer only what this factor could use instead
            available = [m.name for m in manifest.models if m.kind == "sr" and m.factor == factor]
            raise UnknownModelError(name, "sr", available)
        if entry.factor != factor:
            raise ModelMismatchError(
                f"model {entry.name!r} upscales by {entry.factor}, not by {factor}"
            )
        return entry

    def thumbnail_path(self, style: str) -> Path:
        return thumbnail_path(self.root, style)

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        """Public view of the zoo for ``GET /styles``: every style a request may name (with the
        model and slot behind it), every upscaler (``default``: the one ``/upscale`` serves
        for its factor when no model is named), and the style models themselves.

        Built from an allow-list (``public_entry``): the manifest also records where the
        training photos and style images lie on the trainer's disk and the hardware it ran
        on, which tell an outsider about the host and help nobody choose a style."""
        manifest = self.manifest()
        entries = {m.name: m for m in manifest.models}
        styles = []
        for name, ref in sorted(manifest.styles().items()):
            entry = entries[ref.model]
            slot = next((s for s in entry.styles if s.index == ref.index), None)
            styles.append(
                {
                    "name": name,
                    "model": entry.name,
                    "slot": ref.index,
                    "kind": entry.kind,
                    "description": (slot.description if slot else "") or entry.description,
                    "mixable": ref.index is not None,
                    "strength": "conditional" if ref.identity is not None else "pixel blend",
                    "arch": entry.arch.model_dump(mode="json"),
                    "sha256": entry.sha256,
                    "metrics": scrub(slot.metrics if slot else entry.metrics),
                }
            )
        return {
            "styles": styles,
            "upscalers": [
                public_entry(m) | {"default": manifest.is_default_upscaler(m)}
                for m in manifest.models
                if m.kind == "sr"
            ],
            "models": [public_entry(m) for m in manifest.models if m.kind == "style"],
        }


_PUBLIC_TRAINING = (
    "task", "image_size", "batch_size", "iterations", "total_iterations", "lr", "content_weight",
    "style_weight", "tv_weight", "pixel_weight", "norm", "upsample", "output", "loss", "factor",
    "optimizer", "precision", "interrupted",
)  # fmt: skip
_PRIVATE_KEYS = frozenset(
    {"hardware", "threads", "photos", "data", "root", "run_dir", "style_image", "vgg_weights",
     "device", "note", "lineage", "path", "paths", "host"}
)  # fmt: skip
_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\.\.?/)")


def scrub(value: Any) -> Any:
    """``value`` without host-specific details: keys that name paths or hardware are dropped,
    and so is any string that looks like a file path."""
    if isinstance(value, dict):
        return {
            k: scrub(v)
            for k, v in value.items()
            if k not in _PRIVATE_KEYS and not (isinstance(v, str) and _PATH.match(v))
        }
    if isinstance(value, list):
        return [scrub(v) for v in value if not (isinstance(v, str) and _PATH.match(v))]
    return value


def public_entry(entry: ModelEntry) -> dict[str, Any]:
    """One model as ``GET /styles`` shows it: what it is, how it was trained (settings that
    matter to a user) and how good it is; no file paths, no hardware."""
    training = {k: entry.training[k] for k in _PUBLIC_TRAINING if k in entry.training}
    return {
        "name": entry.name,
        "kind": entry.kind,
        "factor": entry.factor,
        "loss": entry.loss,
        "description": entry.description,
        "arch": entry.arch.model_dump(mode="json"),
        "sha256": entry.sha256,
        "num_parameters": entry.num_parameters,
        "iterations": entry.iterations,
        "created": entry.created,
        "training": scrub(training),
        "final_losses": entry.final_losses,
        "metrics": scrub(entry.metrics),
        "styles": [
            {
                "name": slot.name,
                "index": slot.index,
                "role": slot.role,
                "description": slot.description,
                "metrics": scrub(slot.metrics),
            }
            for slot in entry.styles
            if slot.public
        ],
    }

"""Which models the API offers: the zoo manifest, re-read when the file changes.

Torch-free (``model_zoo.manifest`` only). The manifest is cached by modification time and size,
so a model added by the trainer shows up without restarting the API and a request never parses
the file twice for nothing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from model_zoo.manifest import MANIFEST_NAME, Manifest, ModelEntry, read_manifest, zoo_dir

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

    def names(self, kind: str) -> list[str]:
        return self.manifest().names(kind)

    def style(self, name: str) -> ModelEntry:
        return self._get(name, "style")

    def upscaler(self, factor: int, name: str | None = None) -> ModelEntry:
        """The SR model for ``factor``: ``name`` if given, else the default ``x{factor}``."""
        entry = self._get(name or f"x{factor}", "sr")
        if entry.factor != factor:
            raise ModelMismatchError(
                f"model {entry.name!r} upscales by {entry.factor}, not by {factor}"
            )
        return entry

    def thumbnail_path(self, style: str) -> Path:
        return thumbnail_path(self.root, style)

    def _get(self, name: str, kind: str) -> ModelEntry:
        manifest = self.manifest()
        for entry in manifest.models:
            if entry.name == name and entry.kind == kind:
                return entry
        raise UnknownModelError(name, kind, manifest.names(kind))

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        """Public view of the zoo for ``GET /styles``: everything but the weights' file path."""
        manifest = self.manifest()

        def public(entry: ModelEntry) -> dict[str, Any]:
            return entry.model_dump(mode="json", exclude={"weights"})

        return {
            "styles": [public(m) for m in manifest.models if m.kind == "style"],
            "upscalers": [public(m) for m in manifest.models if m.kind == "sr"],
        }

"""What the evaluation protocols share: errors, model loading, output and the run record."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_zoo import registry
from model_zoo.config import MultiStyleNetConfig
from model_zoo.hardware import hardware_description
from model_zoo.manifest import ModelEntry, StyleSlot, read_manifest

log = logging.getLogger("evaluation")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SR_DATA = REPO_ROOT.parent / "shared" / "data" / "sr_bench"


class EvalError(ValueError):
    """Bad evaluation request (unknown model, wrong kind, missing data): exit 2, no traceback."""


def load_model_of_kind(
    name: str, kind: str, root: str | None, device: torch.device
) -> tuple[nn.Module, ModelEntry]:
    try:
        net, entry = registry.load_model(name, root=root, device=device)
    except (registry.ModelNotFoundError, registry.WeightsIntegrityError) as exc:
        raise EvalError(str(exc)) from None
    if entry.kind != kind:
        raise EvalError(f"{name!r} is a {entry.kind} model; this evaluation needs {kind} models")
    return net, entry


@dataclass
class StyleUnderTest:
    """One style to evaluate: a single-style net, or one slot of a multi-style net."""

    name: str
    net: nn.Module
    entry: ModelEntry
    slot: StyleSlot | None = None
    style: torch.Tensor | None = None
    """The multi-style net's one-hot row for this slot (1 x S); None for single-style nets."""

    @property
    def metrics(self) -> dict[str, Any]:
        return self.slot.metrics if self.slot is not None else self.entry.metrics


def one_hot_row(entry: ModelEntry, index: int | None, device: torch.device) -> torch.Tensor | None:
    """A multi-style net's 1 x S selection of slot ``index``; None for a single-style net."""
    if index is None or not isinstance(entry.arch, MultiStyleNetConfig):
        return None
    row = torch.zeros(1, entry.arch.num_styles, device=device)
    row[0, index] = 1.0
    return row


def styles_of_model(
    net: nn.Module, entry: ModelEntry, device: torch.device | None = None
) -> list[StyleUnderTest]:
    """Every style a loaded style net can paint, private slots included (a net about to replace
    another is compared slot by slot, before anyone decides which slots it offers)."""
    device = device or torch.device("cpu")
    if not entry.styles:
        return [StyleUnderTest(entry.name, net, entry)]
    return [
        StyleUnderTest(slot.name, net, entry, slot, one_hot_row(entry, slot.index, device))
        for slot in entry.styles
        if slot.role == "style"
    ]


def load_styles(
    names: list[str] | None, root: str | None, device: torch.device
) -> list[StyleUnderTest]:
    """Styles by name: a style name, or a model name (a multi-style net stands for all its
    public styles); None means every style of the zoo."""
    manifest = read_manifest(root)
    refs = manifest.styles()
    wanted: list[str] = []
    for name in names if names is not None else sorted(refs):
        if name in refs:
            wanted.append(name)
            continue
        entry = next((m for m in manifest.models if m.name == name), None)
        if entry is None:
            raise EvalError(f"no style or model named {name!r}; styles: {', '.join(sorted(refs))}")
        if entry.kind != "style":
            raise EvalError(f"{name!r} is a {entry.kind} model; this evaluation needs styles")
        wanted += [s.name for s in entry.styles if s.role == "style" and s.public] or [name]
    loaded: dict[str, tuple[nn.Module, ModelEntry]] = {}
    styles = []
    for name in wanted:
        ref = refs[name]
        if ref.model not in loaded:
            loaded[ref.model] = load_model_of_kind(ref.model, "style", root, device)
        net, entry = loaded[ref.model]
        slot = next((s for s in entry.styles if s.index == ref.index), None)
        styles.append(StyleUnderTest(name, net, entry, slot, one_hot_row(entry, ref.index, device)))
    return styles


def merge_measurements(
    stored: Mapping[str, dict[str, Any]],
    new: Mapping[str, dict[str, Any]],
    count: Callable[[dict[str, Any]], int],
    label: str,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Stored measurements (by set or size) updated with new ones, except where the stored one
    counted more images: a quick ``--limit 1`` check must never overwrite the full-set numbers
    that the README and the gate quote. Returns the merge and ``label/key`` for each kept one."""
    merged = dict(stored)
    kept: list[str] = []
    for key, result in new.items():
        if key in merged and count(merged[key]) > count(result):
            kept.append(f"{label}/{key}")
            continue
        merged[key] = result
    return merged, kept


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def protocol_record(device: torch.device) -> dict[str, Any]:
    """Where and when a result was measured: stored with it, since timings differ by machine."""
    return {
        "hardware": hardware_description(device),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_outputs(text: str, out: str, payload: Any, json_path: str | None) -> None:
    """Print the Markdown table, write it to ``out`` (unless '-') and the raw results as JSON."""
    print(text)
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        log.info("wrote %s", out)
    if json_path:
        Path(json_path).write_text(json.dumps(payload, indent=1, default=str))

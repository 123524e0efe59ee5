"""What the evaluation protocols share: errors, model loading, output and the run record."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_zoo import registry
from model_zoo.hardware import hardware_description
from model_zoo.manifest import ModelEntry

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

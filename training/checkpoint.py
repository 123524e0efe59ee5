"""Run checkpoints: safetensors (model + Adam state) plus JSON, so resuming never unpickles."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class RunState:
    """Everything besides the tensors that a resumed run continues from."""

    iteration: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    """Training time of the sessions before this one (the checkpoint's total at resume)."""
    lineage: list[dict[str, Any]] = field(default_factory=list)
    lr: float | None = None
    """The base learning rate of the last step (after warm-up and milestones), so whoever
    looks at a live run's checkpoint sees where its schedule stands."""
    init_from: str | None = None
    """The zoo model the run started from: a ``--resume`` need not repeat ``--init-from``, and
    the exported entry must still name its parent (session 13's resumed fine-tune lost it)."""


def _optimizer_tensors(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's state keyed by parameter *name* (``optim.<param>.<key>``), so a resumed run may
    regroup its parameters (another learning rate for some) and still find each one's state."""
    names = {id(p): name for name, p in net.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"optim.{names[id(param)]}.{key}"] = (
                torch.as_tensor(value).detach().cpu().contiguous()
            )
    return tensors


def save_checkpoint(
    path: Path,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: RunState,
    elapsed_s: float,
    average: nn.Module | None = None,
) -> None:
    """Write atomically: a run killed mid-write keeps its previous checkpoint. ``elapsed_s`` is
    the run's training time so far, over every session that resumed it; ``average`` is the
    weights' moving average (``--ema-decay``), kept so a resume continues it."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update(_optimizer_tensors(net, optimizer))
    if average is not None:
        tensors.update(
            {f"ema.{k}": v.detach().cpu().contiguous() for k, v in average.state_dict().items()}
        )
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"iteration": str(state.iteration)})
    os.replace(tmp, path)
    meta = {
        "iteration": state.iteration,
        "phases": state.phases,
        "history": state.history,
        "elapsed_s": elapsed_s,
        "lr": state.lr,
        "lineage": state.lineage,
        "init_from": state.init_from,
    }
    meta_tmp = path.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, path.with_suffix(".json"))


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` with ``param``'s device, dtype *and strides*. A checkpoint's tensors load
    contiguous, the trainer's conv weights are channels_last, and CUDA's fused Adam refuses
    moments whose layout differs from their parameter's ("params, grads, exp_avgs, and
    exp_avg_sqs must have same dtype, device, and layout": the 2026-12-04 lease's resume)."""
    return torch.empty_like(param).copy_(value)


def load_checkpoint(
    path: Path,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    average: nn.Module | None = None,
) -> RunState:
    """Restore the net, Adam's moments and ``average`` (where the checkpoint has one: a run
    that turns ``--ema-decay`` on at a resume starts its average at the resumed weights)."""
    tensors = load_file(str(path))
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    averaged = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    if average is not None and averaged:
        average.load_state_dict(averaged)
    by_name = dict(net.named_parameters())
    # Older checkpoints keyed the state by index into the one group of net.parameters().
    by_index = {str(i): name for i, name in enumerate(by_name)}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            param, _, field = key[len("optim.") :].rpartition(".")
            state.setdefault(by_index.get(param, param), {})[field] = value
    # Fused or capturable Adam keeps its step counter on the device, plain Adam on the host.
    step_on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    for name, fields in state.items():
        param = by_name[name]
        optimizer.state[param] = {
            k: (v.to(param.device) if step_on_device else v) if k == "step" else _like(param, v)
            for k, v in fields.items()
        }
    meta = json.loads(path.with_suffix(".json").read_text())
    return RunState(
        iteration=int(meta["iteration"]),
        history=list(meta["history"]),
        phases=list(meta.get("phases", [])),
        elapsed_s=float(meta.get("elapsed_s", 0.0)),
        lr=meta.get("lr"),  # an export that trains nothing keeps the rate it was trained at
        lineage=list(meta.get("lineage", [])),
        init_from=meta.get("init_from"),
    )


class StopRequested:
    """Turns Ctrl-C / SIGTERM into a flag checked between steps, so no step is half-applied."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> StopRequested:
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

"""The worker's own fast path, wrapped as ``tensor -> tensor`` for the forward benchmark.

Filled in against ``worker.engine`` once it exists; the benchmark must measure what the worker
really runs, not a copy of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def worker_forward(
    net: nn.Module, device: torch.device, *, compile_: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import worker.engine  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("worker.engine is not available yet") from exc
    raise RuntimeError("worker.engine adapter not written yet")

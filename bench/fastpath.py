"""The worker's own fast path (``worker.engine.Engine``), wrapped for the forward benchmark.

The benchmark must time what the worker really runs, not a copy of it, so the net is saved into
a throw-away zoo and loaded by an ``Engine`` exactly as the worker loads it (sha256 check,
ragged rewrite, channels_last, warm-up self-check, PRECISION=auto). A call is ``Engine.run`` on
``batch`` uint8 images, which includes what the worker does around the net: uint8 -> float on
the device, stride padding, autocast, crop, and float -> uint8 back on the host. The naive fp32
reference gets a float tensor already on the device, so the ratio slightly favours the
reference (on CUDA the worker path also pays the host <-> device copies).

Batch limits are raised to the requested batch so one call is one forward pass, and tiling is
off (tile size above the image), so the number measured is the net, not the tiler.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

BENCH_MODEL = "bench-net"


def worker_forward(
    net: nn.Module, device: torch.device, *, precision: str = "auto"
) -> Callable[[torch.Tensor], list[Any]]:
    """``x (B x 3 x H x W float in [0,1]) -> list of EngineOutput``, via the worker's Engine."""
    from model_zoo.config import SRNetConfig
    from model_zoo.registry import save_model
    from worker.engine import Engine

    config = getattr(net, "config", None)
    if config is None:
        raise RuntimeError("the worker path needs a zoo net (with a .config)")
    root = Path(tempfile.mkdtemp(prefix="bench-fastpath-"))
    is_sr = isinstance(config, SRNetConfig)
    save_model(
        net,
        name=BENCH_MODEL,
        kind="sr" if is_sr else "style",
        arch=config,
        root=root,
        **({"factor": config.factor} if is_sr else {}),
    )
    engine = Engine(
        zoo_dir=root,
        device=str(device),
        precision=precision,
        max_batch=1024,
        max_batch_pixels=1 << 40,
        tile_size=1 << 20,
    )
    engine.load([BENCH_MODEL])
    cache: dict[tuple[int, tuple[int, ...]], list[np.ndarray]] = {}

    def run(x: torch.Tensor) -> list[Any]:
        key = (x.data_ptr(), tuple(x.shape))
        if key not in cache:
            # the uploads the API would have decoded: uint8 H x W x 3, on the host
            arrays = (x.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
            cache[key] = [np.ascontiguousarray(a) for a in arrays.cpu().numpy()]
        return engine.run([(BENCH_MODEL, pixels) for pixels in cache[key]])

    run.engine = engine  # type: ignore[attr-defined]
    run.precision = engine.precision  # type: ignore[attr-defined]
    return run


def outputs_to_tensor(outputs: list[Any]) -> torch.Tensor:
    """EngineOutputs (uint8 H x W x 3) -> B x 3 x H x W float in [0, 1] on the CPU."""
    import torch

    stacked = np.stack([o.pixels[..., :3] for o in outputs])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div(255.0)

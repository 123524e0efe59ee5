"""Where a net runs and in which precision: the one decision every caller shares.

The trainer, the worker, evaluation, ``apply`` and the benchmarks all ask :func:`resolve_compute`
for a :class:`Compute` and run their forward passes inside ``compute.autocast()``. Before this was
one helper, the same choice was written five times and drifted (one copy forgot that bf16 is
emulated on AVX2-only CPUs).

bf16 autocast is only a speed-up where the CPU has bf16 instructions (AVX-512-BF16 or AMX): on
an AVX2-only CPU oneDNN has no bf16 kernels, PyTorch falls back to its reference convolution and
a training step becomes about 50x *slower* than fp32 (measured: an SR forward at 32 px, batch 4,
64 s bf16 vs 0.6 s fp32). So "auto" means: the caller's CUDA choice on a GPU, bf16 on a CPU with
native bf16, fp32 otherwise.
"""

from __future__ import annotations

import logging
import platform
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")

log = logging.getLogger("model_zoo.hardware")


def cpu_has_native_bf16() -> bool:
    """True when oneDNN has bf16 kernels for this CPU."""
    return bool(
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )


def auto_precision(device: torch.device, cuda: Precision = "fp16") -> Precision:
    """``cuda`` on a GPU; bf16 on a CPU with native bf16; otherwise fp32."""
    if device.type == "cuda":
        return cuda
    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU. Asking for CUDA without one is an error, not a
    silent CPU run that would be 100x slower than the operator expects."""
    if isinstance(requested, torch.device):
        return requested
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} asked for, but CUDA is not available")
    return device


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """The autocast context for ``precision`` on ``device`` (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@dataclass(frozen=True)
class Compute:
    """A resolved device and precision; ``autocast()`` is the context to run forwards in."""

    device: torch.device
    precision: Precision

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.device, self.precision)

    def synchronize(self) -> None:
        """Wait for queued GPU work, so a timer measures the work and not its launch."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def resolve_compute(
    device: str | torch.device = "auto",
    precision: str = "auto",
    *,
    cuda_precision: Precision = "fp16",
) -> Compute:
    """Resolve ``auto`` device and precision (module docstring) into a :class:`Compute`.

    ``cuda_precision`` is what ``auto`` means on a GPU: fp16 for inference (the worker), bf16 for
    training and evaluation, which need no loss scaling in bf16.
    """
    resolved = resolve_device(device)
    if precision == "auto":
        return Compute(resolved, auto_precision(resolved, cuda_precision))
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    if precision == "bf16" and resolved.type == "cpu" and not cpu_has_native_bf16():
        # Asked for by name, so honoured; but a bf16 habit from a faster machine costs an
        # operator hours here (a 288 px SR training step on one AVX2 thread: ~10 s in fp32,
        # over 35 s in bf16).
        log.warning(
            "bf16 on this CPU is emulated (no AVX-512-BF16 or AMX): expect it far slower "
            "than fp32; precision 'auto' picks fp32 here"
        )
    return Compute(resolved, precision)  # type: ignore[arg-type]


def hardware_description(device: torch.device) -> str:
    """What a manifest records as "hardware": the GPU's name, or the CPU model, its vector ISA,
    whether bf16 is native and the thread count, since all of them change training speed."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    isa += ", native bf16" if cpu_has_native_bf16() else ", no native bf16"
    return f"{cpu}, {isa} ({torch.get_num_threads()} threads)"

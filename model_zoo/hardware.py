"""Which reduced precision this machine runs natively.

bf16 autocast is only a speed-up where the CPU has bf16 instructions (AVX-512-BF16 or AMX): on
an AVX2-only CPU oneDNN has no bf16 kernels, PyTorch falls back to its reference convolution and
a training step becomes about 50x *slower* than fp32 (measured: an SR forward at 32 px, batch 4,
64 s bf16 vs 0.6 s fp32). Every "auto" precision in the project goes through here.
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]


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

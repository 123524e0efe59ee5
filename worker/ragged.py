"""Run images of different sizes (and tiles with borrowed statistics) as one exact batch.

A batch tensor must be rectangular, so smaller images sit in the top-left corner of a larger
canvas. Two things would make such a padded batch differ from running each image alone:

* **Reflection padding** inside the net would reflect the canvas border instead of the image's
  own border, and the filler would leak into the image's edge pixels.
* **InstanceNorm** would take its statistics over the whole canvas, filler included.

``make_ragged`` rewrites a loaded net in place so that, while a ``RaggedBatch`` is active, every
``ReflectionPad2d`` reflects each sample at its *own* valid border, every ``InstanceNorm2d``
takes each sample's statistics over its *own* valid region, and zero-padded / transposed convs
see zeros outside it. Everything else in the nets (convs, ReLU, BatchNorm in eval, nearest
upsampling, residual sums, tanh) is local, so the valid region of every layer is then computed
exactly as it would be alone; filler pixels only ever produce filler.

The same InstanceNorm hook can *freeze* statistics: a tile of a large image is normalised with
the statistics of the whole image (recorded in an earlier pass) instead of its own, which is
what makes tiled style transfer seamless (see ``worker.tiling``).

Valid sizes are tracked by ratio: the canvas and every sample are padded to a multiple of the
net's total stride, so at a layer whose feature map is ``H'`` high a sample of input height
``h`` on a canvas of height ``H`` is exactly ``h * H' / H`` high.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Stats = list[tuple[torch.Tensor, torch.Tensor]]
"""Per InstanceNorm layer, in forward order: (mean, var), each of shape (C,) float32."""


class RaggedUnsupportedError(RuntimeError):
    """The net contains a layer whose padded-batch behaviour we cannot make exact."""


@dataclass
class RaggedBatch:
    """What the rewritten layers need to know about the batch currently in flight."""

    canvas: tuple[int, int]
    valid: list[tuple[int, int]]
    frozen: list[Stats | None]
    record: bool = False
    """Keep the statistics each sample was normalised with (``RaggedNet.split_stats``)."""
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def valid_at(self, height: int, width: int) -> list[tuple[int, int]]:
        canvas_h, canvas_w = self.canvas
        sizes = []
        for h, w in self.valid:
            if (h * height) % canvas_h or (w * width) % canvas_w:
                raise RaggedUnsupportedError(
                    f"valid size {h}x{w} does not scale to a {height}x{width} feature map"
                )
            sizes.append((h * height // canvas_h, w * width // canvas_w))
        return sizes


class _Context:
    """Shared by all rewritten layers of one net; ``batch`` is None outside ``ragged()``."""

    def __init__(self) -> None:
        self.batch: RaggedBatch | None = None
        self.num_norms = 0


class RaggedReflectionPad2d(nn.Module):
    """ReflectionPad2d that reflects each sample at its own valid border."""

    def __init__(self, original: nn.ReflectionPad2d, context: _Context) -> None:
        super().__init__()
        self.padding = tuple(int(p) for p in original.padding)  # left, right, top, bottom
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pad(x, self.padding, mode="reflect")
        batch = self.context.batch
        if batch is None:
            return out
        left, right, top, bottom = self.padding
        for i, (h, w) in enumerate(batch.valid_at(x.shape[-2], x.shape[-1])):
            if (h, w) != (x.shape[-2], x.shape[-1]):
                own = F.pad(x[i : i + 1, :, :h, :w], self.padding, mode="reflect")
                out[i : i + 1, :, : h + top + bottom, : w + left + right] = own
        return out


class RaggedInstanceNorm2d(nn.Module):
    """InstanceNorm2d over each sample's valid region, or with frozen (borrowed) statistics.

    Each sample is normalised by the native batch-norm kernel on its own 1 x C x h x w view:
    in training mode that kernel computes exactly instance statistics, in float32 whatever the
    autocast dtype, without an upcast copy, and keeps channels_last; in eval mode it applies
    frozen statistics. (A hand-written float32 version was ~70x slower under bf16.)

    Uniform batches (every sample full-size, nothing frozen) keep this per-sample loop on
    purpose. The one-call alternative - ``F.instance_norm``'s trick of viewing the batch as
    1 x (N*C) x H x W for the same kernel - needs an NCHW copy, and the NCHW kernel reduces in
    another order than the channels_last one: on the full-size style net in bf16 its outputs
    differ from the per-sample path by ~3/255, more than the 1/255 a batch may differ from each
    image alone (it would be consistent only if every padded sample took it too), and with the
    layout copies it is 10-20x slower per layer on CPU (8.1 vs 0.37 ms for 4 x 128 x 64² bf16).
    The loop costs N small kernel calls and one ``torch.cat`` (~3 ms per image at 256 px, 3-4%
    of the pass). Group norm with C groups is one call on channels_last, but its reduction
    order depends on the batch size, so it breaks batch equivalence outright.
    """

    def __init__(self, original: nn.InstanceNorm2d, context: _Context, index: int) -> None:
        super().__init__()
        self.weight = original.weight
        self.bias = original.bias
        self.eps = float(original.eps)
        self.context = context
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.context.batch
        full = (int(x.shape[-2]), int(x.shape[-1]))
        sizes = [full] * x.shape[0] if batch is None else batch.valid_at(*full)
        outputs, means, variances = [], [], []
        for i, (h, w) in enumerate(sizes):
            sample = x[i : i + 1]
            frozen = None if batch is None else batch.frozen[i]
            if frozen is not None:
                mean, var = (t.to(x.device) for t in frozen[self.index])
                out = F.batch_norm(sample, mean, var, self.weight, self.bias, False, 0.0, self.eps)
            else:
                region = sample
                if (h, w) != full:
                    # Same layout as the image alone, hence the same reduction order and the
                    # same bits: under bf16 a 1e-7 difference here grows to several levels.
                    region = sample[..., :h, :w].contiguous(memory_format=torch.channels_last)
                normed, mean, invstd = torch.native_batch_norm(
                    region, self.weight, self.bias, None, None, True, 0.0, self.eps
                )
                var = invstd.pow(-2) - self.eps
                if (h, w) == full:
                    out = normed
                else:  # filler keeps its (meaningless) values; only the valid region matters
                    out = sample.clone()
                    out[..., :h, :w] = normed
            outputs.append(out)
            means.append(mean)
            variances.append(var)
        if batch is not None and batch.record:
            batch.recorded[self.index] = (torch.stack(means), torch.stack(variances))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _zero_outside_valid(context: _Context):
    """Forward pre-hook for zero-padded and transposed convs: filler must read as zeros."""

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        batch = context.batch
        if batch is None:
            return None
        (x,) = args
        sizes = batch.valid_at(x.shape[-2], x.shape[-1])
        if all(s == (x.shape[-2], x.shape[-1]) for s in sizes):
            return None
        x = x.clone()
        for i, (h, w) in enumerate(sizes):
            x[i, :, h:, :] = 0
            x[i, :, :, w:] = 0
        return (x,)

    return hook


@dataclass
class RaggedNet:
    """A net rewritten for ragged batches, with the facts the engine needs about it."""

    net: nn.Module
    context: _Context
    stride: int
    """Product of the conv strides: inputs are padded to a multiple of it."""
    num_norms: int
    """How many per-image InstanceNorm layers: 0 means tiles need no frozen statistics."""

    @contextmanager
    def ragged(self, batch: RaggedBatch) -> Iterator[RaggedBatch]:
        self.context.batch = batch
        try:
            yield batch
        finally:
            self.context.batch = None

    def split_stats(self, batch: RaggedBatch) -> list[Stats]:
        """The statistics each sample of ``batch`` was normalised with, ready to freeze."""
        layers = [batch.recorded[k] for k in range(self.num_norms)]
        return [
            [(mean[i].detach().float(), var[i].detach().float()) for mean, var in layers]
            for i in range(len(batch.valid))
        ]

    @torch.inference_mode()
    def receptive_radius(self, device: torch.device) -> int:
        """Receptive-field radius in input pixels, from one probe forward: every conv adds
        ``(k - 1) / 2 * dilation`` feature pixels, each worth (net input size / feature size)
        input pixels, which hooks read off the real feature maps (so functional upsampling is
        accounted for). Tiles need this much context on each side to be exact."""
        size = 16 * self.stride
        contributions: list[float] = []

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            jump = size / args[0].shape[-1]
            if isinstance(module, nn.ConvTranspose2d):
                jump /= module.stride[1]
            contributions.append((module.kernel_size[1] - 1) / 2 * module.dilation[1] * jump)

        handles = [
            m.register_forward_pre_hook(hook)
            for m in self.net.modules()
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
        ]
        try:
            self.net(torch.zeros(1, 3, size, size, device=device))
        finally:
            for handle in handles:
                handle.remove()
        # Nearest upsampling and strided sampling can each shift the footprint by one step.
        return int(sum(contributions) + 0.999) + self.stride


_LOCAL_LEAVES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.Tanh,
    nn.Sigmoid,
    nn.BatchNorm2d,
    nn.Upsample,
    nn.Dropout,
)


def per_image_norms(net: nn.Module) -> list[tuple[nn.Module, str, nn.InstanceNorm2d]]:
    """Every InstanceNorm that normalises with each image's own statistics, as (parent, attribute,
    layer), in the order that indexes ``Stats``: other runtimes that take frozen statistics
    (``worker.openvino_runtime``) must number the layers the same way."""
    return [
        (parent, name, child)
        for parent in list(net.modules())
        for name, child in list(parent.named_children())
        if isinstance(child, nn.InstanceNorm2d)
        and not (child.track_running_stats and child.running_mean is not None)
    ]


def make_ragged(net: nn.Module) -> RaggedNet:
    """Rewrite ``net`` in place (see the module docstring); raises ``RaggedUnsupportedError``
    when a layer's padded behaviour is unknown, in which case the caller batches equal sizes
    only and does not tile."""
    context = _Context()
    stride = 1
    norms = 0
    for module in net.modules():
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise RaggedUnsupportedError(f"conv with {module.padding_mode} padding")
        if isinstance(module, nn.BatchNorm2d) and module.training:
            raise RaggedUnsupportedError("BatchNorm in training mode")
    for parent, name, child in per_image_norms(net):
        setattr(parent, name, RaggedInstanceNorm2d(child, context, norms))
        norms += 1
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReflectionPad2d):
                setattr(parent, name, RaggedReflectionPad2d(child, context))
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            if any(int(p) for p in module.padding):  # type: ignore[union-attr]
                module.register_forward_pre_hook(_zero_outside_valid(context))
            stride *= module.stride[0]
        elif isinstance(module, nn.ConvTranspose2d):
            module.register_forward_pre_hook(_zero_outside_valid(context))
        elif (
            not list(module.children())
            and not isinstance(module, _LOCAL_LEAVES)
            and not isinstance(module, RaggedReflectionPad2d | RaggedInstanceNorm2d)
        ):
            raise RaggedUnsupportedError(f"unknown layer type {type(module).__name__}")
    context.num_norms = norms
    return RaggedNet(net, context, stride, norms)


def pad_to_stride(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Pad bottom/right to a multiple of ``stride`` the way ``model_zoo.nets.StyleNet`` does, so
    a pre-padded image gives the net the very input it would have built itself."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % stride, (-width) % stride
    if not (pad_h or pad_w):
        return x
    mode = "reflect" if min(height, width) > stride else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)

"""The inference engine: zoo models loaded once, and batches of images through them.

Each model is loaded through ``model_zoo.registry.load_model`` (sha256-verified), rewritten for
ragged batches (``worker.ragged``), put in channels_last and warmed up with a self-check: two
images of different sizes run as one padded batch must match each run alone. A model that
fails the check (an architecture ``worker.ragged`` does not know) is still served, batching
equal sizes only and without tiling.

``Engine.run`` takes any list of (model, HxWx3|4 uint8) requests and turns each into work units:
the whole image, or - above ``TILE_SIZE`` - overlapping tiles plus, for InstanceNorm nets, one
statistics pass whose statistics every tile then uses (``worker.tiling``). Units of one model
are packed into forward passes by ``worker.batching.pack``; because a padded pass is exact, a
request's pixels do not depend on what else was in the batch. A pass holds at most
``MAX_BATCH_PIXELS`` output pixels: by default a memory bound on CUDA, but one 256² image on
CPU, where bigger passes make each image slower (``worker.settings`` has the measurements).

Precision: ``inference_mode`` always; autocast to bf16 on CPUs with native bf16 and to fp16 on
CUDA (``PRECISION=auto``), per model only where calibration shows the output stays within
``MIN_PSNR_DB`` of fp32 and, on a CPU, a timed probe shows it pays (``_faster_precision``).
Where the whole net fails the gate, the first one or two layers of a multi-style net may stay
float32 and the rest be reduced (``MAX_FULL_PRECISION_HEAD``): calibration keeps the fewest
that pass. InstanceNorm statistics stay float32 (``worker.ragged``).
Alpha: the RGB part goes through the net; for style the alpha channel is re-attached as it
was, for SR it is resized with Pillow's bicubic filter to the output size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from jobqueue.protocol import StyleControls
from model_zoo.config import MultiStyleNetConfig
from model_zoo.hardware import Compute, Precision, resolve_compute
from model_zoo.imaging import tensor_to_uint8
from model_zoo.manifest import ModelEntry, read_manifest
from model_zoo.nets import MultiStyleNet, max_full_precision_head
from model_zoo.registry import list_models, load_model
from worker import openvino_runtime
from worker.batching import pack
from worker.ragged import (
    RaggedBatch,
    RaggedNet,
    RaggedUnsupportedError,
    Stats,
    make_ragged,
    pad_to_stride,
)
from worker.settings import CPU_AUTO_BATCH_PIXELS, CUDA_AUTO_BATCH_PIXELS
from worker.tiling import Tile, TileAccumulator, TilePlan, auto_overlap, plan_tiles

log = logging.getLogger(__name__)

CALIBRATION_DIR = Path(__file__).with_name("calibration")
CALIBRATION_IMAGES = tuple(sorted(CALIBRATION_DIR.glob("*.png")))
"""Real photos (two Kodak images, released for unrestricted use) at 192 px, the probes of the
precision gate."""
CALIBRATION_IMAGE = CALIBRATION_IMAGES[0]

SPEED_PROBE_SIDE = 384
"""Output side (px) of the timed probe that decides reduced precision against fp32 on a CPU."""
SPEED_PROBE_RUNS = 3
CPU_OPENVINO_WHOLE_MAX_PIXELS = 2048 * 2048
"""``WHOLE_MAX_PIXELS=auto``: images up to this many pixels run whole in OpenVINO, not as tiles.

Tiles need a statistics pass (PyTorch, on a copy of at most ``TILE_STATS_SIZE``) and overlap:
on the 2-core Zen 4 the style net took 2.0-2.2 s per megapixel as PyTorch tiles (1536-2048 px)
and 0.42 whole in OpenVINO, which also needs no approximation; OpenVINO tiles (session 8,
Zen 5, one thread) still cost 1.4-1.8 s against 0.5 whole (``python -m bench tiles``). 2048²
whole peaked ~0.5 GB above the loaded worker (3000² ~2 GB), inside the CPU worker's 4 GiB limit
(``deploy/k8s/cpu``). The price is preemption: a small job waits for one whole pass (1.8 s at
2048² there) instead of one tile."""
MAX_FULL_PRECISION_HEAD = 2
"""Where reduced precision fails the gate, calibration retries with the first 1, then 2 layers
of a multi-style net in float32 (``MultiStyleNet.full_precision_head``). Rounding the photo
and the first layer's output costs the most: on the session-10 weights of the 8/32/32 net,
OpenVINO bf16 read 39.3 dB worst-case on the calibration photos, 44.8 with one f32 layer and
51.4 with two, at 36 / 48 / 57 ms for a 512 px image on one thread of a Xeon with AMX,
against 122 ms in f32; the session-11 weights needed two (39.0 / 39.99 / 45.9 dB) (``README``,
"bf16 with a float32 head"). Deeper heads would cost most of what bf16 saves."""
MIN_REDUCED_SPEEDUP = 1.1
"""Reduced precision must be this much faster than fp32 to be served: at equal speed fp32 is
the better output, and a smaller margin would flip with timing noise."""


def resolve_batch_pixels(value: int | Literal["auto"], device: torch.device) -> int:
    """``auto``: a memory bound on CUDA, one 256² image per pass on CPU, where a bigger pass
    makes every image in it slower (measurements in ``worker.settings``)."""
    if value != "auto":
        return int(value)
    return CUDA_AUTO_BATCH_PIXELS if device.type == "cuda" else CPU_AUTO_BATCH_PIXELS


@dataclass
class LoadedModel:
    name: str
    entry: ModelEntry
    net: nn.Module
    ragged: RaggedNet | None
    """None when the net could not be rewritten: equal-size batches only, no tiling."""
    stride: int
    factor: int
    radius: int
    exact_padding: bool
    """The warm-up self-check passed: mixed sizes may share a padded forward pass."""
    precision: Precision = "fp32"
    """What this model runs in: the engine's reduced precision unless calibration showed it
    costs more than ``min_psnr_db`` for this model's weights (then fp32)."""
    calibration_psnr_db: float = float("inf")
    full_precision_head: int = 0
    """Leading layers kept in float32 under reduced precision: the fewest with which the
    reduced-precision output passed calibration (``MAX_FULL_PRECISION_HEAD``)."""
    precision_timings_ms: dict[str, float] = field(default_factory=dict)
    """The CPU speed probe's median times per precision (empty where no probe ran)."""
    executor: openvino_runtime.OpenVINOExecutor | None = None
    """The CPU runtime for whole images of style nets (``worker.openvino_runtime``); None:
    every pass runs in PyTorch."""

    @property
    def runtime(self) -> str:
        return "openvino" if self.executor is not None else "torch"

    def keep_head_precise(self, layers: int) -> None:
        """Run the first ``layers`` layers in float32 in every runtime this model uses."""
        self.full_precision_head = layers
        if isinstance(self.net, MultiStyleNet):
            self.net.full_precision_head = layers

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def num_styles(self) -> int | None:
        """Slots of a conditional (multi-style) net; None for a net with one behaviour."""
        arch = self.entry.arch
        return arch.num_styles if isinstance(arch, MultiStyleNetConfig) else None

    def style_rows(self) -> list[torch.Tensor | None]:
        """One-hot rows for every trained slot (what calibration and self-checks probe)."""
        if self.num_styles is None:
            return [None]
        return [torch.eye(self.num_styles)[i : i + 1] for i in range(self.num_styles)]

    @property
    def needs_stats(self) -> bool:
        return self.ragged is not None and self.ragged.num_norms > 0


@dataclass
class EngineOutput:
    pixels: np.ndarray
    """H x W x 3|4 uint8 (alpha kept when the request had it)."""
    batch_size: int
    """Most requests that shared one forward pass with this one (1 = ran alone)."""
    stopped: bool = False
    """``should_stop`` dropped the request before it was finished: ``pixels`` is empty."""
    tiled: bool = False
    """The image ran as tiles (its cost per pixel differs: ``worker.costs``)."""


@dataclass
class _Request:
    index: int
    model: LoadedModel
    height: int
    width: int
    padded: torch.Tensor
    """1 x 3 x H' x W' on the device, padded to the model's stride."""
    alpha: np.ndarray | None
    plan: TilePlan | None
    controls: StyleControls = field(default_factory=StyleControls)
    style: torch.Tensor | None = None
    """1 x S style-weight row for a conditional net (on the device)."""
    stats: Stats | None = None
    output: torch.Tensor | None = None
    accumulator: TileAccumulator | None = None
    batch_size: int = 1
    stopped: bool = False


@dataclass
class _Unit:
    request: _Request
    tensor: torch.Tensor
    frozen: Stats | None
    done: Callable[[torch.Tensor, Stats | None], None]
    wants_stats: bool = False
    shape: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.shape = (int(self.tensor.shape[-2]), int(self.tensor.shape[-1]))


class Engine:
    def __init__(
        self,
        *,
        zoo_dir: str | os.PathLike[str] | None = None,
        device: str = "auto",
        precision: str = "auto",
        min_psnr_db: float = 40.0,
        cpu_runtime: str = "auto",
        max_batch: int = 8,
        max_batch_pixels: int | Literal["auto"] = "auto",
        max_pad_fraction: float = 0.25,
        tile_size: int = 1024,
        tile_overlap: int | Literal["auto"] = "auto",
        tile_stats_size: int = 1024,
        whole_max_pixels: int | Literal["auto"] = 0,
    ) -> None:
        self.zoo_dir = Path(zoo_dir) if zoo_dir is not None else None
        # auto: fp16 on CUDA; bf16 on a CPU with native bf16 (emulated bf16 is slower than fp32)
        compute = resolve_compute(device, precision, cuda_precision="fp16")
        self.device, self.precision = compute.device, compute.precision
        # An operator's explicit PRECISION is only quality-gated; auto on a CPU is also timed.
        self.choose_by_speed = precision == "auto" and self.device.type == "cpu"
        self.min_psnr_db = min_psnr_db
        if cpu_runtime not in ("auto", "torch", "openvino"):
            raise ValueError(f"unknown CPU runtime {cpu_runtime!r}")
        self.use_openvino = self.device.type == "cpu" and (
            cpu_runtime == "openvino" or (cpu_runtime == "auto" and openvino_runtime.available())
        )
        self.max_batch = max_batch
        self.max_batch_pixels = resolve_batch_pixels(max_batch_pixels, self.device)
        self.max_pad_fraction = max_pad_fraction
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.tile_stats_size = tile_stats_size
        self.whole_max_pixels = whole_max_pixels
        self._force_tiles = False
        self.models: dict[str, LoadedModel] = {}
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    # ----------------------------------------------------------------------------- models

    def available(self) -> list[str]:
        return [entry.name for entry in list_models(self.zoo_dir)]

    def tiling(self, name: str) -> tuple[int, int]:
        """When ``name`` tiles an input: (side, pixels): an input whose longer side exceeds
        ``side`` and whose pixels exceed ``pixels`` runs as tiles (side 0: never tiled)."""
        model = self.model(name)
        if model.ragged is None:
            return 0, 0
        return self._tile_in(model), self._whole_max_pixels(model)

    def _whole_max_pixels(self, model: LoadedModel) -> int:
        """Pixels up to which an image above the tile size still runs whole: only where whole
        images have a runtime of their own (OpenVINO), and not while tiling is forced."""
        if model.executor is None or self._force_tiles:
            return 0
        if self.whole_max_pixels == "auto":
            return CPU_OPENVINO_WHOLE_MAX_PIXELS
        return self.whole_max_pixels

    @contextlib.contextmanager
    def forced_tiles(self) -> Iterator[None]:
        """Tile every input above the tile size (the cost probe measures the tiled path on an
        image that would otherwise run whole)."""
        self._force_tiles = True
        try:
            yield
        finally:
            self._force_tiles = False

    def model(self, name: str) -> LoadedModel:
        """The loaded model, loading it on first use; raises ``ModelNotFoundError``."""
        if name not in self.models:
            self.models[name] = self._load(name)
        return self.models[name]

    def load(self, names: list[str] | None = None) -> list[str]:
        """Load and warm up ``names`` (default: every model in the manifest); returns the models.

        A name may also be a style that a multi-style net serves (``WORKER_MODELS=mosaic,x4``):
        operators think in styles, and a style moving into a multi-style net must not break
        their configuration. The style's net is loaded, once however many of its styles are
        named."""
        if not names:
            names = self.available()
        else:
            manifest = read_manifest(self.zoo_dir)
            models, styles = set(manifest.names()), manifest.styles()
            names = list(
                dict.fromkeys(
                    styles[name].model if name not in models and name in styles else name
                    for name in names
                )
            )
        for name in names:
            self.model(name)
        return names

    def _load(self, name: str) -> LoadedModel:
        started = time.perf_counter()
        net, entry = load_model(name, root=self.zoo_dir, device=self.device)
        net.requires_grad_(False)
        executor = None
        if self.use_openvino and openvino_runtime.supports(net):
            # Exported before worker.ragged rewrites the net's layers for padded batches.
            executor = openvino_runtime.OpenVINOExecutor(net, torch.get_num_threads())
        try:
            ragged: RaggedNet | None = make_ragged(net)
        except RaggedUnsupportedError as exc:
            log.warning("model %s: no padded batching or tiling (%s)", name, exc)
            ragged = None
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        stride = ragged.stride if ragged else 1
        radius = ragged.receptive_radius(self.device) if ragged else 0
        with torch.inference_mode():
            probe = torch.zeros(1, 3, 4 * stride, 4 * stride, device=self.device)
            factor = int(net(probe).shape[-1]) // (4 * stride)
        model = LoadedModel(name, entry, net, ragged, stride, factor, radius, False)
        model.executor = executor
        model.precision = self._calibrate_precision(model)
        # With a second runtime for whole images, a mixed-size (PyTorch) pass would give an
        # image other pixels than it gets alone; so such models batch equal sizes only.
        model.exact_padding = (
            ragged is not None and model.executor is None and self._self_check(model)
        )
        log.info(
            "loaded %s (%s, x%d, stride %d, radius %d px, padded batching %s) on %s/%s/%s in %.2fs",
            name,
            entry.kind,
            factor,
            stride,
            radius,
            "on" if model.exact_padding else "off",
            self.device,
            model.runtime,
            f"{model.precision}"
            + (
                f" after {model.full_precision_head} fp32 layer(s)"
                if model.full_precision_head
                else ""
            )
            + f" ({model.calibration_psnr_db:.1f} dB vs fp32"
            + "".join(f", {p} {ms:.1f} ms" for p, ms in model.precision_timings_ms.items())
            + ")",
            time.perf_counter() - started,
        )
        return model

    def _calibrate_precision(self, model: LoadedModel) -> Precision:
        """Measure what reduced precision costs *this* model's weights, and refuse it if too much.

        Rounding error depends on the trained weights, not just the architecture (errors
        compound through up to 16 instance-norm layers and can move where a net draws a
        stroke), and on the input: a flat patch has tiny instance-norm variances that magnify
        rounding, so a grey probe read 25 dB where photos read ~50 dB on the same trained net.
        The probes are therefore real photos (``CALIBRATION_IMAGES``), every style slot of a
        multi-style net is probed, and the worst PSNR decides, measured on the uint8 outputs a
        caller would get against PyTorch fp32. Where OpenVINO runs tiles too, its
        frozen-statistics export is probed as well, given the statistics PyTorch measured.
        """
        requested = self.precision
        if model.executor is not None and requested != "fp32" and not openvino_runtime.runs_bf16():
            log.info(
                "model %s: OpenVINO has no %s kernels on this CPU (it would run f32); serving fp32",
                model.name,
                requested,
            )
            requested = "fp32"
        if requested == "fp32" and model.executor is None:
            return "fp32"
        references = []
        for path in CALIBRATION_IMAGES:
            probe = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
            probe = probe.permute(2, 0, 1).unsqueeze(0).float() / 255
            if model.factor > 1:  # SR: a low-resolution input of the same photo
                probe = F.interpolate(probe, scale_factor=0.25, mode="bicubic", antialias=True)
            probe = pad_to_stride(probe.clamp(0, 1).to(self.device), model.stride)
            for style in model.style_rows():
                styles = [None if style is None else style.to(self.device)]
                model.precision = "fp32"
                frozen_too = model.needs_stats and model.executor is not None
                reference, stats = self._forward(
                    model, [probe], [None], want_stats=frozen_too, styles=styles, runtime="torch"
                )
                references.append((probe, styles, reference[0], stats))
        heads = (
            [0]
            if requested == "fp32"
            else range(min(MAX_FULL_PRECISION_HEAD, max_full_precision_head(model.net)) + 1)
        )
        for head in heads:
            model.keep_head_precise(head)
            model.precision = requested
            worst_mse = 0.0
            for probe, styles, reference, stats in references:
                served = [self._forward(model, [probe], [None], styles=styles)[0]]
                if stats is not None:  # the tiles' path: the same image, statistics given
                    served.append(self._forward(model, [probe], [stats[0]], styles=styles)[0])
                for reduced in served:
                    error = ((reference.clamp(0, 1) - reduced[0].clamp(0, 1)) * 255).round()
                    worst_mse = max(worst_mse, float(error.pow(2).mean()))
            psnr = float("inf") if worst_mse == 0 else 10 * math.log10(255**2 / worst_mse)
            model.calibration_psnr_db = psnr
            if psnr >= self.min_psnr_db:
                break
            log.info(
                "model %s: %s with %d float32 layer(s) first is %.1f dB from fp32 (< %.1f)",
                model.name,
                requested,
                head,
                psnr,
                self.min_psnr_db,
            )
        else:
            model.keep_head_precise(0)
            log.warning(
                "model %s: %s output is %.1f dB from fp32 (< MIN_PSNR_DB=%.1f) even with %d "
                "float32 layer(s) first; serving it in fp32",
                model.name,
                requested,
                model.calibration_psnr_db,
                self.min_psnr_db,
                head,
            )
            return "fp32"
        if self.choose_by_speed and requested != "fp32":
            return self._faster_precision(model)
        return requested

    def _faster_precision(self, model: LoadedModel) -> Precision:
        """Time reduced precision against fp32 on this CPU and keep the faster.

        Native bf16 does not mean fast bf16: on a 2-core Zen 4 OpenVINO's bf16 kernels ran the
        style net 2.2x faster than its f32 (52 vs 114 ms at 384 px), but on an Intel Xeon whose
        VM hides AMX they were slower (323 vs 219 ms at 512 px), and the worker served bf16
        there because it passed the quality gate. The probe is one photo at ``SPEED_PROBE_SIDE`` px
        on the whole-image path that most requests take, after a warm-up pass (OpenVINO
        compiles per shape); reduced precision must win by ``MIN_REDUCED_SPEEDUP``."""
        photo = torch.from_numpy(np.asarray(Image.open(CALIBRATION_IMAGE).convert("RGB")).copy())
        photo = photo.permute(2, 0, 1).unsqueeze(0).float() / 255
        side = max(model.stride, SPEED_PROBE_SIDE // model.factor)
        probe = F.interpolate(photo, size=(side, side), mode="bicubic", antialias=True)
        probe = pad_to_stride(probe.clamp(0, 1).to(self.device), model.stride)
        style = model.style_rows()[-1]
        styles = [None if style is None else style.to(self.device)]
        timings: dict[str, float] = {}
        for precision in (self.precision, "fp32"):
            model.precision = precision
            self._forward(model, [probe], [None], styles=styles)  # warm-up
            runs = []
            for _ in range(SPEED_PROBE_RUNS):
                started = time.perf_counter()
                self._forward(model, [probe], [None], styles=styles)
                runs.append(time.perf_counter() - started)
            timings[precision] = 1000 * sorted(runs)[len(runs) // 2]
        model.precision_timings_ms = timings
        if timings["fp32"] >= MIN_REDUCED_SPEEDUP * timings[self.precision]:
            return self.precision
        log.info(
            "model %s: %s is not %.2gx faster than fp32 here (%.1f vs %.1f ms at %d px); "
            "serving fp32",
            model.name,
            self.precision,
            MIN_REDUCED_SPEEDUP,
            timings[self.precision],
            timings["fp32"],
            SPEED_PROBE_SIDE,
        )
        model.keep_head_precise(0)
        return "fp32"

    def _self_check(self, model: LoadedModel) -> bool:
        """Warm-up that proves a padded batch equals each image alone for this net."""
        generator = torch.Generator().manual_seed(0)
        s = model.stride
        sizes = [(12 * s + 1, 9 * s + 3), (7 * s + 2, 11 * s)]
        images = [torch.rand(1, 3, h, w, generator=generator).to(self.device) for h, w in sizes]
        padded = [pad_to_stride(x, s) for x in images]
        # Two different styles in one pass: per-sample conditioning must not leak either.
        rows = model.style_rows()
        styles = [rows[0], rows[-1]]
        styles = [None if r is None else r.to(self.device) for r in styles]
        alone = [
            self._forward(model, [p], [None], styles=[st])[0][0]
            for p, st in zip(padded, styles, strict=True)
        ]
        together, _ = self._forward(model, padded, [None, None], styles=styles)
        worst = max(
            (a.float() - t.float()).abs().max().item() for a, t in zip(alone, together, strict=True)
        )
        if worst > 0.5 / 255:
            log.warning(
                "model %s: padded batch differs by %.4f; batching equal sizes only",
                model.name,
                worst,
            )
            return False
        return True

    # ------------------------------------------------------------------------- forward

    def _forward(
        self,
        model: LoadedModel,
        tensors: list[torch.Tensor],
        frozen: list[Stats | None],
        want_stats: bool = False,
        styles: list[torch.Tensor | None] | None = None,
        runtime: str = "auto",
    ) -> tuple[list[torch.Tensor], list[Stats] | None]:
        """One forward pass over ``tensors`` (1 x 3 x h x w each, stride-padded) placed on one
        canvas. Returns each output cropped to its own size (float32, on the device) and, for
        InstanceNorm nets, the statistics each was normalised with. ``styles`` are the
        conditional net's per-sample style rows (requests for different styles share the
        pass); None elsewhere."""
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        heights, widths = [h for h, _ in sizes], [w for _, w in sizes]
        canvas_h, canvas_w = max(heights), max(widths)
        f = model.factor
        uniform = all(h == canvas_h for h in heights) and all(w == canvas_w for w in widths)
        borrowed = all(fr is not None for fr in frozen)
        if (
            model.executor is not None
            and runtime != "torch"
            and uniform
            and not want_stats
            and (all(fr is None for fr in frozen) or borrowed)
            and (not borrowed or model.executor.takes_frozen_stats)
        ):
            # Straight to OpenVINO in NCHW: no canvas copy, no channels_last reorder. Tiles
            # (all with borrowed statistics) take the executor's frozen-statistics export.
            rows = None
            if model.num_styles is not None:
                rows = torch.cat(
                    [
                        row if row is not None else model.style_rows()[0]
                        for row in (styles or [None] * len(tensors))
                    ]
                )
            canvas = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
            precision = "bf16" if model.precision in ("bf16", "fp16") else "f32"
            out = model.executor(
                canvas,
                rows,
                precision,
                frozen=[fr for fr in frozen if fr is not None] or None,
                head=model.full_precision_head,
            )
            return [out[i, :, : h * f, : w * f] for i, (h, w) in enumerate(sizes)], None
        if uniform:
            canvas = torch.cat(tensors)
        else:
            canvas = tensors[0].new_zeros(len(tensors), 3, canvas_h, canvas_w)
            for i, t in enumerate(tensors):
                canvas[i, :, : heights[i], : widths[i]] = t[0]
        canvas = canvas.contiguous(memory_format=torch.channels_last)
        args: tuple[torch.Tensor, ...] = (canvas,)
        if model.num_styles is not None:
            rows = [
                row if row is not None else model.style_rows()[0].to(self.device)
                for row in (styles or [None] * len(tensors))
            ]
            args = (canvas, torch.cat(rows).to(self.device))
        with torch.inference_mode(), Compute(self.device, model.precision).autocast():
            if model.ragged is None:
                out = model.net(*args)
                stats = None
            else:
                batch = RaggedBatch((canvas_h, canvas_w), sizes, frozen, record=want_stats)
                with model.ragged.ragged(batch):
                    out = model.net(*args)
                stats = model.ragged.split_stats(batch) if want_stats else None
        out = out.float()
        return [out[i, :, : h * f, : w * f] for i, (h, w) in enumerate(sizes)], stats

    def _run_units(
        self, model: LoadedModel, units: list[_Unit], poll: Callable[[], None] | None = None
    ) -> None:
        if not units:
            return
        groups = pack(
            [u.shape for u in units],
            max_units=self.max_batch,
            max_pixels=self.max_batch_pixels,
            max_pad_fraction=self.max_pad_fraction if model.exact_padding else 0.0,
            scale=model.factor,
        )
        for group in groups:
            if all(units[i].request.stopped for i in group.members):
                continue
            if poll is not None:
                poll()  # between forward passes (and so between tiles): drop stopped requests
            members = [units[i] for i in group.members if not units[i].request.stopped]
            if not members:
                continue
            outputs, stats = self._forward(
                model,
                [u.tensor for u in members],
                [u.frozen for u in members],
                want_stats=model.needs_stats and any(u.wants_stats for u in members),
                styles=[u.request.style for u in members],
            )
            sharing = len({id(u.request) for u in members})
            for k, unit in enumerate(members):
                unit.request.batch_size = max(unit.request.batch_size, sharing)
                unit.done(outputs[k], stats[k] if stats is not None and unit.wants_stats else None)

    # ----------------------------------------------------------------------------- run

    def _overlap_in(self, model: LoadedModel) -> int:
        if self.tile_overlap == "auto":
            return auto_overlap(model.radius, model.stride)
        return -(-self.tile_overlap // model.factor)

    def _tile_in(self, model: LoadedModel) -> int:
        """The input tile side: ``TILE_SIZE`` / factor, raised where a tile could not advance by
        its overlap (most of every pass would be spent on context)."""
        return max(self.tile_size // model.factor, 2 * self._overlap_in(model))

    def _tile_plan(self, model: LoadedModel, height: int, width: int) -> TilePlan | None:
        tile_in = self._tile_in(model)
        if model.ragged is None or (height <= tile_in and width <= tile_in):
            return None
        if height * width <= self._whole_max_pixels(model):
            return None
        overlap_in = self._overlap_in(model)
        plan = plan_tiles(
            height,
            width,
            tile=tile_in,
            overlap=overlap_in,
            radius=model.radius,
            stride=model.stride,
        )
        return plan if plan.is_tiled else None

    def _stats_input(self, request: _Request) -> torch.Tensor:
        """The image whose InstanceNorm statistics a tiled request borrows: itself when small
        enough, else an antialiased downscale (bounded memory, approximate statistics)."""
        image = request.padded
        longest = max(request.height, request.width)
        if longest <= self.tile_stats_size:
            return image
        scale = self.tile_stats_size / longest
        size = (max(1, round(request.height * scale)), max(1, round(request.width * scale)))
        original = image[..., : request.height, : request.width]
        small = F.interpolate(original, size=size, mode="bilinear", antialias=True)
        return pad_to_stride(small, request.model.stride)

    def run(
        self,
        requests: Sequence[tuple[str, np.ndarray] | tuple[str, np.ndarray, StyleControls]],
        should_stop: Callable[[], Collection[int]] | None = None,
    ) -> list[EngineOutput]:
        """Compute every request (model name, H x W x 3|4 uint8, optional style controls).
        Raises on any failure (model unknown, image too small for the net, a slot the net does
        not have, out of memory): the caller retries one by one.

        ``should_stop``, if given, is called before every forward pass (so between the tiles of
        a big image too) and returns the indices of the requests nobody waits for any more
        (cancelled, past their deadline): their remaining passes are skipped and their output
        comes back ``stopped``. The caller may also use the call to do other work between two
        passes (the worker computes small jobs there while a big one runs)."""
        states: list[_Request] = []
        for index, request in enumerate(requests):
            name, pixels = request[0], request[1]
            controls = request[2] if len(request) > 2 else StyleControls()  # type: ignore[misc]
            model = self.model(name)
            style = self._style_row(model, controls)
            if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
                raise ValueError(f"expected H x W x 3|4 uint8 pixels, got {pixels.shape}")
            height, width = int(pixels.shape[0]), int(pixels.shape[1])
            tensor = _to_float_tensor(pixels[..., :3], self.device)
            padded = pad_to_stride(tensor, model.stride)
            alpha = pixels[..., 3] if pixels.shape[2] == 4 else None
            plan = self._tile_plan(model, int(padded.shape[-2]), int(padded.shape[-1]))
            states.append(
                _Request(index, model, height, width, padded, alpha, plan, controls, style)
            )

        poll: Callable[[], None] | None = None
        if should_stop is not None:
            stop = should_stop

            def drop_stopped() -> None:
                for index in stop():
                    states[index].stopped = True

            poll = drop_stopped

        by_model: dict[str, list[_Request]] = {}
        for state in states:
            by_model.setdefault(state.model.name, []).append(state)
        for name, group in by_model.items():
            self._run_model(self.models[name], group, poll)
        return [self._finish(state) for state in states]

    def _style_row(self, model: LoadedModel, controls: StyleControls) -> torch.Tensor | None:
        """The conditional net's style-weight row: the slots, with ``strength`` < 1 moving
        weight to the identity slot (``model_zoo.styles``)."""
        if model.num_styles is None:
            if controls.slots:
                raise ValueError(f"model {model.name} has no style slots")
            return None
        if not controls.slots:
            return model.style_rows()[0].to(self.device)
        if any(index >= model.num_styles for index, _ in controls.slots) or (
            controls.identity is not None and controls.identity >= model.num_styles
        ):
            raise ValueError(f"model {model.name} has {model.num_styles} slots")
        share = controls.strength if controls.identity is not None else 1.0
        row = torch.zeros(1, model.num_styles)
        for index, weight in controls.slots:
            row[0, index] += share * weight
        if controls.identity is not None:
            row[0, controls.identity] += 1.0 - controls.strength
        return row.to(self.device)

    def _run_model(
        self,
        model: LoadedModel,
        requests: list[_Request],
        poll: Callable[[], None] | None = None,
    ) -> None:
        # Pass 1: whole images, plus the statistics pass of tiled InstanceNorm images.
        first: list[_Unit] = []
        for request in requests:
            if request.plan is None:
                first.append(_Unit(request, request.padded, None, _store_output(request)))
            elif model.needs_stats:
                first.append(
                    _Unit(request, self._stats_input(request), None, _store_stats(request), True)
                )
        self._run_units(model, first, poll)
        # Pass 2: tiles, normalised with their image's statistics.
        second: list[_Unit] = []
        for request in requests:
            if request.plan is None or request.stopped:
                continue
            request.accumulator = TileAccumulator(request.plan, model.factor)
            for tile in request.plan.tiles:
                view = request.padded[..., tile.top : tile.bottom, tile.left : tile.right]
                second.append(_Unit(request, view, request.stats, _accumulate(request, tile)))
        self._run_units(model, second, poll)

    def _finish(self, request: _Request) -> EngineOutput:
        f = request.model.factor
        if request.stopped:
            channels = 3 if request.alpha is None else 4
            empty = np.zeros((0, 0, channels), np.uint8)
            return EngineOutput(empty, request.batch_size, stopped=True)
        if request.accumulator is not None:
            image = request.accumulator.image
        else:
            assert request.output is not None
            image = request.output
        image = image[:, : request.height * f, : request.width * f]
        if request.model.kind == "style":
            image = _apply_controls(image, request)
        rgb = _to_uint8(image)
        tiled = request.plan is not None
        if request.alpha is None:
            return EngineOutput(rgb, request.batch_size, tiled=tiled)
        alpha = request.alpha
        if f != 1:
            resized = Image.fromarray(alpha, "L").resize(
                (request.width * f, request.height * f), Image.Resampling.BICUBIC
            )
            alpha = np.asarray(resized)
        return EngineOutput(np.dstack([rgb, alpha]), request.batch_size, tiled=tiled)


def _to_float_tensor(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """H x W x 3 uint8 -> 1 x 3 x H x W float32 in [0, 1] on ``device``.

    On a CPU in numpy, single-threaded: these are microseconds of work, and torch's parallel
    elementwise kernels measured 10x slower than that when the worker shares its cores (its
    OpenMP threads wait on each other; 5.4 ms instead of 0.5 for a 256 px image)."""
    if device.type == "cpu":
        array = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)
        array *= 1.0 / 255.0
        return torch.from_numpy(array)
    # Job pixels are a read-only view of the Redis reply; torch wants writable memory.
    tensor = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).to(device)
    return tensor.permute(2, 0, 1)[None].float().div_(255.0)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """3 x H x W float in [0, 1] -> H x W x 3 uint8 (rounded); numpy on a CPU, as above."""
    if image.device.type != "cpu":
        return tensor_to_uint8(image)[0]
    array = np.clip(image.detach().float().numpy(), 0.0, 1.0) * 255.0
    return np.ascontiguousarray(np.rint(array).astype(np.uint8).transpose(1, 2, 0))


# BT.601 full-range RGB <-> YCbCr, as JPEG and Pillow's "YCbCr" mode use it.
_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
_FROM_YCBCR = torch.linalg.inv(_TO_YCBCR)


def _apply_controls(image: torch.Tensor, request: _Request) -> torch.Tensor:
    """Strength without an identity slot (a pixel blend with the photo) and keep-colours
    (luminance from the stylised image, chroma from the photo: Gatys et al. 2016's
    luminance-only transfer, applied to a feed-forward output). Both are per pixel, so tiled
    and whole images get the same result."""
    controls = request.controls
    blend = controls.strength < 1.0 and controls.identity is None
    if not (blend or controls.keep_colors):
        return image
    photo = request.padded[0, :, : request.height, : request.width].float().to(image.device)
    if blend:
        image = controls.strength * image + (1.0 - controls.strength) * photo
    if controls.keep_colors:
        to_ycbcr = _TO_YCBCR.to(image.device)
        luma = torch.einsum("ij,jhw->ihw", to_ycbcr[:1], image.clamp(0, 1))
        chroma = torch.einsum("ij,jhw->ihw", to_ycbcr[1:], photo)
        image = torch.einsum("ij,jhw->ihw", _FROM_YCBCR.to(image.device), torch.cat([luma, chroma]))
    return image.clamp(0, 1)


def _store_output(request: _Request) -> Callable[[torch.Tensor, Stats | None], None]:
    # Kept where it was computed: on a GPU the controls and the rounding to uint8 then run
    # there and a quarter of the bytes cross to the host. Copying the float32 image first
    # made the worker's path 8x the bare forward at 1024 px, batch 32 on the 2026-12-04 H200
    # (21.2 against 2.7 ms per image: the host's numpy rounding and a 12 MB copy per image).
    def done(output: torch.Tensor, _stats: Stats | None) -> None:
        request.output = output

    return done


def _store_stats(request: _Request) -> Callable[[torch.Tensor, Stats | None], None]:
    def done(_output: torch.Tensor, stats: Stats | None) -> None:
        request.stats = stats

    return done


def _accumulate(request: _Request, tile: Tile) -> Callable[[torch.Tensor, Stats | None], None]:
    def done(output: torch.Tensor, _stats: Stats | None) -> None:
        assert request.accumulator is not None
        request.accumulator.add(tile, output)

    return done

"""Offline trainer: ``python -m model_zoo.train style ...`` and ``... train sr ...``.

One loop serves both tasks; what differs (the targets and the loss) is a small objective object.
Checkpoints are safetensors (model + Adam state) plus JSON, so resuming never unpickles anything.
Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and exports the model as
trained so far into the zoo, so an interrupted run is still usable.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model_zoo import manifest, registry
from model_zoo.config import SRNetConfig, StyleNetConfig
from model_zoo.data import ImageFolderCrops, InfiniteSampler, degrade
from model_zoo.hardware import auto_precision, cpu_has_native_bf16
from model_zoo.imaging import load_rgb, to_tensor
from model_zoo.losses import feature_loss, gram_matrix, pixel_loss, style_loss, tv_loss
from model_zoo.nets import build_net
from model_zoo.report import save_loss_curve, save_sample_grid
from model_zoo.vgg import CONTENT_LAYER, STYLE_LAYERS, VGG16Features

log = logging.getLogger("model_zoo.train")


@dataclass
class TrainSettings:
    """Everything that defines a run; stored verbatim in the manifest entry."""

    task: str
    name: str
    data: str
    image_size: int
    batch_size: int = 4
    iterations: int = 40_000
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int = 500
    log_every: int = 10
    run_dir: str = "runs"
    zoo: str | None = None
    vgg_weights: str | None = None
    # both: the weight of the relu2_2 feature term (style's content; SR's feat or pixel term).
    # The same 1e5 in both keeps TV weights comparable: TV is a per-image *sum* (losses.py).
    content_weight: float = 1e5
    # style
    style_image: str | None = None
    style_size: int | None = 512
    style_weight: float = 5e5
    tv_weight: float = 3.0
    norm: str = "instance"
    upsample: str = "nearest+conv"
    # sr
    factor: int = 4
    loss: str = "feat"
    output: str = "tanh"
    # SR feat only: an extra per-pixel MSE term (content-weight units) that anchors colour,
    # which relu2_2 features barely constrain.
    pixel_weight: float = 0.0
    # Start from a zoo model's weights (same architecture): an SR feature run from the pixel
    # model, or a new style from a trained style net, which already reconstructs content: on
    # the CPU, starry_night from mosaic was usable after ~450 iterations, where runs from
    # scratch needed 1,000-1,600.
    init_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """bf16 needs no loss scaler; it is the default only where it is native (model_zoo.hardware)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


# Settings that mean nothing for the other task, kept out of its manifest entry.
_OTHER_TASK_SETTINGS = {
    "style": {"factor", "loss", "output", "pixel_weight"},
    "sr": {"style_image", "style_size", "style_weight", "norm"},
}


def hardware_description(device: torch.device) -> str:
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


class StyleObjective:
    """Content (relu2_2) + style (Grams of relu1_2..relu4_3 of one style image) + TV."""

    def __init__(self, settings: TrainSettings, vgg: VGG16Features, device: torch.device) -> None:
        self.settings, self.vgg = settings, vgg
        assert settings.style_image is not None
        style = load_rgb(settings.style_image)
        if settings.style_size:
            scale = settings.style_size / max(style.size)
            style = style.resize(
                (round(style.width * scale), round(style.height * scale)), resample=3
            )
        with torch.no_grad():
            feats = vgg(to_tensor(style).to(device))
            self.style_grams = {k: gram_matrix(feats[k]) for k in STYLE_LAYERS}

    def inputs_and_targets(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return batch, batch

    def __call__(
        self, output: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        out_feats = self.vgg(output)
        with torch.no_grad():
            content = self.vgg(target)[CONTENT_LAYER]
        terms = {
            "content": s.content_weight * feature_loss(out_feats[CONTENT_LAYER], content),
            "style": s.style_weight * style_loss(out_feats, self.style_grams),
            "tv": s.tv_weight * tv_loss(output),
        }
        total = terms["content"] + terms["style"] + terms["tv"]
        return total, {k: float(v.detach()) for k, v in terms.items()}


class SRObjective:
    """Feature reconstruction at relu2_2 (``feat``) or per-pixel MSE (``pixel``), plus TV."""

    def __init__(self, settings: TrainSettings, vgg: VGG16Features | None) -> None:
        self.settings, self.vgg = settings, vgg

    def inputs_and_targets(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return degrade(batch, self.settings.factor), batch

    def __call__(
        self, output: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        if s.loss == "feat":
            assert self.vgg is not None
            with torch.no_grad():
                target_feat = self.vgg(target)[CONTENT_LAYER]
            main = feature_loss(self.vgg(output)[CONTENT_LAYER], target_feat)
        else:
            main = pixel_loss(output, target)
        terms = {s.loss: s.content_weight * main, "tv": s.tv_weight * tv_loss(output)}
        if s.loss == "feat" and s.pixel_weight:
            terms["pixel"] = s.pixel_weight * pixel_loss(output, target)
        total = sum(terms.values())
        return total, {k: float(v.detach()) for k, v in terms.items()}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors


def save_checkpoint(
    path: Path,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    history: list[dict[str, float]],
    phases: list[dict[str, Any]],
    elapsed_s: float = 0.0,
    lineage: list[dict[str, Any]] | None = None,
) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update(_optimizer_tensors(optimizer))
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"iteration": str(iteration)})
    os.replace(tmp, path)
    meta = {
        "iteration": iteration,
        "phases": phases,
        "history": history,
        "elapsed_s": elapsed_s,
        "lineage": lineage or [],
    }
    path.with_suffix(".json").write_text(json.dumps(meta))


def load_checkpoint(
    path: Path, net: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, list[dict[str, float]], list[dict[str, Any]], float, list[dict[str, Any]]]:
    tensors = load_file(str(path))
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)
    meta = json.loads(path.with_suffix(".json").read_text())
    return (
        int(meta["iteration"]),
        list(meta["history"]),
        list(meta.get("phases", [])),
        float(meta.get("elapsed_s", 0.0)),
        list(meta.get("lineage", [])),
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


def _batches(loader: DataLoader[torch.Tensor]) -> Iterator[torch.Tensor]:
    while True:
        yield from loader


def train(settings: TrainSettings) -> registry.ModelEntry:
    """Run (or resume) one training run and write the model into the zoo."""
    torch.manual_seed(settings.seed)
    device = pick_device(settings.device)
    precision = (
        settings.precision if settings.precision != "auto" else auto_precision(device, "bf16")
    )
    run_dir = Path(settings.run_dir) / settings.name
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "checkpoint.safetensors"

    if settings.task == "style":
        arch: StyleNetConfig | SRNetConfig = StyleNetConfig(
            norm=settings.norm,  # type: ignore[arg-type]
            upsample=settings.upsample,  # type: ignore[arg-type]
        )
    else:
        arch = SRNetConfig(
            factor=settings.factor,  # type: ignore[arg-type]
            upsample=settings.upsample,  # type: ignore[arg-type]
            output=settings.output,  # type: ignore[arg-type]
        )
    net = build_net(arch).to(device).train()
    lineage: list[dict[str, Any]] = []
    if settings.init_from and not (settings.extra.get("resume") and checkpoint.exists()):
        source, source_entry = registry.load_model(settings.init_from, root=settings.zoo)
        if source_entry.arch != arch:
            raise ValueError(
                f"--init-from {settings.init_from}: its architecture {source_entry.arch} "
                f"differs from this run's {arch}"
            )
        net.load_state_dict(source.state_dict())
        lineage = manifest.lineage_of(source_entry)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    needs_vgg = settings.task == "style" or settings.loss == "feat"
    vgg = VGG16Features(settings.vgg_weights).to(device) if needs_vgg else None
    objective: StyleObjective | SRObjective = (
        StyleObjective(settings, vgg, device)  # type: ignore[arg-type]
        if settings.task == "style"
        else SRObjective(settings, vgg)
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    start, history, phases, previous_s = 0, [], [], 0.0
    if settings.extra.get("resume") and checkpoint.exists():
        start, history, phases, previous_s, lineage = load_checkpoint(checkpoint, net, optimizer)
        log.info("resumed %s at iteration %d", checkpoint, start)
    # A resumed run may change weights or lr (a curriculum); each phase is recorded so the
    # manifest tells exactly how the shipped weights were trained.
    phase = {
        "from_iteration": start,
        "lr": settings.lr,
        "tv_weight": settings.tv_weight,
        "content_weight": settings.content_weight,
    }
    if settings.task == "style":
        phase |= {"style_weight": settings.style_weight}
    if not phases or {k: v for k, v in phases[-1].items() if k != "from_iteration"} != {
        k: v for k, v in phase.items() if k != "from_iteration"
    }:
        phases.append(phase)

    dataset = ImageFolderCrops(settings.data, settings.image_size, seed=settings.seed + start)
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=InfiniteSampler(len(dataset), settings.seed + start),
        num_workers=int(settings.extra.get("workers", 0)),
        drop_last=True,
    )
    batches = _batches(loader)
    picks = dataset.files[:: max(1, len(dataset) // 4)]
    sample_photos = [img for img in map(dataset.load, picks) if img is not None][:4]
    started = time.perf_counter()
    iteration = start
    last_terms: dict[str, float] = {}
    bar = tqdm(
        total=settings.iterations,
        initial=start,
        desc=f"{settings.task}:{settings.name}",
        unit="it",
        dynamic_ncols=True,
        disable=settings.extra.get("quiet", False),
    )
    with StopRequested() as stop:
        while iteration < settings.iterations and not stop.requested:
            step_start = time.perf_counter()
            batch = next(batches).to(device, non_blocking=True)
            inputs, targets = objective.inputs_and_targets(batch)
            with autocast_for(device, precision):
                output = net(inputs)
                loss, last_terms = objective(output, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            iteration += 1
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(
                    f"loss became {float(loss.detach())} at iteration {iteration}"
                )
            step_time = time.perf_counter() - step_start
            history.append({"iteration": iteration, "total": float(loss.detach()), **last_terms})
            bar.update(1)
            if iteration % settings.log_every == 0 or iteration == settings.iterations:
                bar.set_postfix(
                    {k: f"{v:.3g}" for k, v in last_terms.items()}
                    | {"img/s": f"{settings.batch_size / step_time:.2f}"}
                )
            if iteration % settings.checkpoint_every == 0:
                save_checkpoint(
                    checkpoint,
                    net,
                    optimizer,
                    iteration,
                    history,
                    phases,
                    previous_s + time.perf_counter() - started,
                    lineage,
                )
                write_run_report(net, objective, sample_photos, history, run_dir, settings, device)
    bar.close()
    wall = previous_s + time.perf_counter() - started
    save_checkpoint(checkpoint, net, optimizer, iteration, history, phases, wall, lineage)
    if stop.requested:
        log.warning("stopped at iteration %d; checkpoint %s; exporting", iteration, checkpoint)

    write_run_report(net, objective, sample_photos, history, run_dir, settings, device)
    net.eval()
    recent = history[-50:] or [{}]
    final = {k: sum(h[k] for h in recent) / len(recent) for k in recent[0] if k != "iteration"}
    n_images = len(dataset.files) - len(dataset.bad)
    entry = registry.save_model(
        net.cpu(),
        name=settings.name,
        kind=settings.task,
        arch=arch,
        root=settings.zoo,
        factor=settings.factor if settings.task == "sr" else None,
        loss=settings.loss if settings.task == "sr" else "perceptual",
        training={
            k: v
            for k, v in asdict(settings).items()
            if k not in ("extra", "zoo") and k not in _OTHER_TASK_SETTINGS[settings.task]
        }
        | {
            "precision": precision,
            "optimizer": "Adam",
            "interrupted": stop.requested,
            "phases": phases,
            "lineage": lineage,
            "total_iterations": iteration + sum(run["iterations"] for run in lineage),
        },
        data={"root": str(settings.data), "images": n_images, "crop": settings.image_size},
        iterations=iteration,
        final_losses=final,
        hardware=hardware_description(device),
        wall_time_s=round(wall, 1),
    )
    log.info(
        "wrote %s (%s) to the zoo after %d iterations", entry.name, entry.sha256[:12], iteration
    )
    return entry


def write_run_report(
    net: nn.Module,
    objective: StyleObjective | SRObjective,
    photos: list[Image.Image],
    history: list[dict[str, float]],
    run_dir: Path,
    settings: TrainSettings,
    device: torch.device,
) -> None:
    """Sample grids and the loss curve, rewritten at every checkpoint so a run can be judged
    (and its weights changed with ``--resume``) while it trains, not only after it ends.

    Style runs also get a grid at twice the crop size: the paper chose weights by looking at
    256 and 512 px, and a style's texture scale relative to the content differs between them.
    """
    was_training = net.training
    net.eval()
    save_sample_grid(net, objective, photos, run_dir / "samples.jpg", settings, device)
    if settings.task == "style":
        large = 2 * settings.image_size
        save_sample_grid(
            net, objective, photos, run_dir / f"samples_{large}.jpg", settings, device, large
        )
    save_loss_curve(history, run_dir / "loss_curve.png")
    net.train(was_training)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_zoo.train", description=__doc__)
    tasks = parser.add_subparsers(dest="task", required=True)

    def common(p: argparse.ArgumentParser, size: int) -> None:
        p.add_argument("--name", required=True, help="zoo model name, e.g. mosaic or x4")
        p.add_argument("--data", required=True, help="folder tree of training photos")
        p.add_argument("--image-size", type=int, default=size, help="training crop size (px)")
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--iterations", type=int, default=40_000)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--tv-weight", type=float, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1")
        p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
        p.add_argument("--checkpoint-every", type=int, default=500)
        p.add_argument("--log-every", type=int, default=10, help="progress-bar refresh (its)")
        p.add_argument("--run-dir", default="runs", help="checkpoints, samples, loss curve")
        p.add_argument("--zoo", default=None, help="zoo folder (default: $MODEL_ZOO_DIR or ours)")
        p.add_argument("--vgg-weights", default=None, help="explicit VGG-16 weights file")
        p.add_argument("--upsample", default="nearest+conv", choices=["nearest+conv", "transposed"])
        p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
        p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--init-from", default=None, help="start from this zoo model's weights")

    style = tasks.add_parser("style", help="train a style transfer net")
    common(style, 256)
    style.add_argument("--style-image", required=True)
    style.add_argument("--style-size", type=int, default=512, help="longer side of style image")
    style.add_argument("--content-weight", type=float, default=1e5, help="relu2_2 feature term")
    style.add_argument("--style-weight", type=float, default=5e5)
    style.add_argument("--norm", default="instance", choices=["instance", "batch"])

    sr = tasks.add_parser("sr", help="train a super-resolution net")
    common(sr, 288)
    sr.add_argument("--factor", type=int, default=4, choices=[4, 8])
    sr.add_argument("--loss", default="feat", choices=["feat", "pixel"])
    sr.add_argument(
        "--content-weight", type=float, default=1e5, help="weight of the feat or pixel term"
    )
    sr.add_argument(
        "--output",
        default="tanh",
        choices=["tanh", "bicubic_residual"],
        help="the paper's tanh image, or a residual added to bicubic (see SRNetConfig)",
    )
    sr.add_argument(
        "--pixel-weight", type=float, default=0.0, help="feat only: add this x per-pixel MSE"
    )
    sr.set_defaults(iterations=200_000)
    return parser


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    values = vars(args).copy()
    extra = {k: values.pop(k) for k in ("resume", "workers", "quiet")}
    tv = values.pop("tv_weight")
    settings = TrainSettings(**values, extra=extra)
    if tv is not None:
        settings.tv_weight = tv
    elif settings.task == "sr":
        settings.tv_weight = 0.0 if settings.loss == "pixel" else 1.0
    return settings


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(build_parser().parse_args(argv))
    entry = train(settings)
    print(json.dumps({"name": entry.name, "iterations": entry.iterations, "sha256": entry.sha256}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training loop every model family shares (what differs is a ``training.tasks`` task).

Checkpoints are safetensors plus JSON (``training.checkpoint``), so resuming never unpickles.
Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and exports the model as
trained so far into the zoo, so an interrupted run is still usable.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model_zoo import manifest, registry
from model_zoo.hardware import Compute, hardware_description, resolve_compute
from training.averaging import WeightAverage, exported
from training.checkpoint import RunState, StopRequested, load_checkpoint, save_checkpoint
from training.data import ImageFolderCrops, InfiniteSampler
from training.report import save_loss_curve
from training.schedule import apply_lr, check_milestones
from training.settings import RUNTIME_ONLY, TrainSettings
from training.tasks import TASKS, TrainingTask
from training.vgg import VGG16Features

log = logging.getLogger("training")


def task_for(settings: TrainSettings) -> TrainingTask:
    try:
        return TASKS[settings.task](settings)
    except KeyError:
        raise ValueError(f"unknown task {settings.task!r}; known: {sorted(TASKS)}") from None


def _batches(loader: DataLoader[torch.Tensor]) -> Iterator[torch.Tensor]:
    while True:
        yield from loader


def _record_phase(task: TrainingTask, state: RunState, extra: dict[str, Any] | None = None) -> None:
    """A resumed run may change weights or lr (a curriculum); each phase is recorded so the
    manifest tells exactly how the shipped weights were trained. ``extra``: what the caller's
    loop adds to the task's settings (the GPU stage's budget decay)."""
    settings = task.phase() | (extra or {})
    last = {k: v for k, v in (state.phases[-1] if state.phases else {}).items()}
    last.pop("from_iteration", None)
    if not state.phases or last != settings:
        state.phases.append({"from_iteration": state.iteration, **settings})


def start_run(task: TrainingTask, device: torch.device) -> tuple[nn.Module, RunState, Path, bool]:
    """What every training loop does first: the run folder, the net (from ``--init-from`` with
    its lineage, unless resuming), in channels_last on ``device``.

    Returns the net, the fresh run state, the checkpoint path and whether a checkpoint will be
    resumed (the caller loads it once its optimiser exists)."""
    settings = task.settings
    # The export at the end must be accepted: a multi-style run into a zoo whose single-style
    # nets offer the same style names was refused only after its hours of training.
    registry.check_entry(
        name=settings.name,
        kind=task.kind,
        arch=task.architecture(),
        root=settings.zoo,
        **task.manifest_fields(),
    )
    run_dir = Path(settings.run_dir) / settings.name
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "checkpoint.safetensors"
    resuming = settings.resume and checkpoint.exists()
    net = task.build_net().to(device).train()
    state = RunState(lineage=task.initial_lineage())
    if settings.init_from and not resuming:
        source, source_entry = registry.load_model(
            settings.init_from, root=settings.init_zoo or settings.zoo
        )
        task.init_from(net, source, source_entry)
        state.lineage = manifest.lineage_of(source_entry)
        state.init_from = settings.init_from
    # channels_last: oneDNN and cuDNN both run these convs fastest in NHWC (the VGG forward
    # 4.5x faster on a 2-core AVX-512 CPU).
    net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return net, state, checkpoint, resuming


def train(settings: TrainSettings) -> registry.ModelEntry:
    """Run (or resume) one training run and write the model into the zoo."""
    task = task_for(settings)
    check_milestones(settings.lr_milestones, settings.lr_gamma)
    torch.manual_seed(settings.seed)
    compute = resolve_compute(settings.device, settings.precision, cuda_precision="bf16")
    device = compute.device
    net, state, checkpoint, resuming = start_run(task, device)
    if settings.export_only and not resuming:  # before the loss network is read
        raise FileNotFoundError(f"--export-only: no checkpoint at {checkpoint}")
    run_dir = checkpoint.parent
    # The fixed loss network is stored in the autocast dtype once instead of being cast at
    # every call (15% of a CPU step).
    vgg = None
    if task.needs_vgg:
        vgg = VGG16Features(settings.vgg_weights, layers=task.vgg_layers).to(
            device, memory_format=torch.channels_last
        )
        if compute.precision != "fp32":
            vgg = vgg.to({"bf16": torch.bfloat16, "fp16": torch.float16}[compute.precision])
    task.prepare(vgg, device)
    groups = task.param_groups(net)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.Adam(
        [group | {"lr": settings.lr * group["lr_scale"]} for group in groups], lr=settings.lr
    )
    scaler = torch.amp.GradScaler(device.type, enabled=compute.precision == "fp16")
    average = WeightAverage(net, settings.ema_decay) if settings.ema_decay else None
    kept = average.model if average is not None else None  # what checkpoints store of it

    if resuming:
        state = load_checkpoint(checkpoint, net, optimizer, kept)
        log.info("resumed %s at iteration %d", checkpoint, state.iteration)
    if settings.export_only:
        return export_checkpoint(task, net, average, state, compute)
    if average is not None:
        average.start_from(net)
    _record_phase(task, state)
    start = state.iteration

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
    bar = tqdm(
        total=settings.iterations,
        initial=start,
        desc=f"{settings.task}:{settings.name}",
        unit="it",
        dynamic_ncols=True,
        disable=settings.extra.get("quiet", False),
    )

    def elapsed() -> float:
        return state.elapsed_s + time.perf_counter() - started

    with StopRequested() as stop:
        while state.iteration < settings.iterations and not stop.requested:
            step_start = time.perf_counter()
            batch = next(batches).to(device, non_blocking=True)
            with compute.autocast():
                loss, terms = task.loss(net, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            state.lr = apply_lr(optimizer, settings, state.iteration)
            if settings.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if average is not None:
                average.update()
            state.iteration += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at iteration {state.iteration}")
            step_time = time.perf_counter() - step_start
            state.history.append({"iteration": state.iteration, "total": value, **terms})
            bar.update(1)
            if state.iteration % settings.log_every == 0 or state.iteration == settings.iterations:
                bar.set_postfix(
                    {k: f"{v:.3g}" for k, v in terms.items()}
                    | {"lr": f"{state.lr:.2g}", "img/s": f"{settings.batch_size / step_time:.2f}"}
                )
            if state.iteration % settings.checkpoint_every == 0:
                save_checkpoint(checkpoint, net, optimizer, state, elapsed(), kept)
                shipped = exported(net, average)
                write_run_report(task, shipped, sample_photos, state.history, run_dir, device)
    bar.close()
    wall = elapsed()
    save_checkpoint(checkpoint, net, optimizer, state, wall, kept)
    if stop.requested:
        log.warning(
            "stopped at iteration %d; checkpoint %s; exporting", state.iteration, checkpoint
        )
    shipped = exported(net, average)
    write_run_report(task, shipped, sample_photos, state.history, run_dir, device)
    entry = export(task, shipped, state, compute, wall, dataset, interrupted=stop.requested)
    log.info(
        "wrote %s (%s) to the zoo after %d iterations",
        entry.name,
        entry.sha256[:12],
        state.iteration,
    )
    return entry


def export_checkpoint(
    task: TrainingTask,
    net: nn.Module,
    average: WeightAverage | None,
    state: RunState,
    compute: Compute,
) -> registry.ModelEntry:
    """``--export-only``: the loaded checkpoint into the zoo as it stands, so a run can be
    gated and evaluated while it trains on. Nothing in the run folder is written (a second
    writer could put an older checkpoint back under the live run), and no phase is recorded
    for this command's settings: the entry describes the steps the checkpoint holds."""
    settings = task.settings
    dataset = ImageFolderCrops(settings.data, settings.image_size, seed=settings.seed)
    entry = export(
        task, exported(net, average), state, compute, state.elapsed_s, dataset, interrupted=True
    )
    log.info("exported %s at iteration %d to %s", entry.name, state.iteration, settings.zoo)
    return entry


def export(
    task: TrainingTask,
    net: nn.Module,
    state: RunState,
    compute: Compute,
    wall: float,
    dataset: ImageFolderCrops,
    *,
    interrupted: bool,
) -> registry.ModelEntry:
    """Write the net and its manifest entry (every setting, phase and earlier run) to the zoo."""
    settings = task.settings
    net.eval()
    recent = state.history[-50:]
    keys = dict.fromkeys(k for h in recent for k in h if k != "iteration")
    final = {
        k: sum(h[k] for h in recent if k in h) / sum(1 for h in recent if k in h) for k in keys
    }
    record: dict[str, Any] = {
        k: v for k, v in asdict(settings).items() if k not in RUNTIME_ONLY
    } | {
        "init_from": state.init_from or settings.init_from,  # a resume ignores the flag
        "precision": compute.precision,
        "optimizer": "Adam",
        "interrupted": interrupted,
        "phases": state.phases,
        "lineage": state.lineage,
        "total_iterations": state.iteration + sum(run["iterations"] for run in state.lineage),
    }
    n_images = len(dataset.files) - len(dataset.bad)
    return registry.save_model(
        net.cpu(),
        name=settings.name,
        kind=task.kind,
        arch=task.architecture(),
        root=settings.zoo,
        training=record,
        data={"root": str(settings.data), "images": n_images, "crop": settings.image_size},
        iterations=state.iteration,
        final_losses=final,
        hardware=hardware_description(compute.device),
        wall_time_s=round(wall, 1),
        **task.manifest_fields(),
    )


def write_run_report(
    task: TrainingTask,
    net: nn.Module,
    photos: list[Image.Image],
    history: list[dict[str, float]],
    run_dir: Path,
    device: torch.device,
) -> None:
    """Sample grids and the loss curve, rewritten at every checkpoint so a run can be judged
    (and its weights changed with ``--resume``) while it trains, not only after it ends."""
    was_training = net.training
    net.eval()
    task.write_samples(net, photos, run_dir, device)
    save_loss_curve(history, run_dir / "loss_curve.png")
    net.train(was_training)

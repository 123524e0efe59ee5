"""The campaign: every model of the zoo trained on one GPU within one command's budget.

``python -m training.gpu.campaign train`` runs the stages in order, each on a share of the time
that is left (a stage that fails early leaves its time to the next), all in one process so
the pack is decoded onto the GPU once. ``export`` then packs each model (weights, manifest
entry, sample grids, loss curve, checkpoint, speed) into one tar, plus ``summary.json``: at most
8 files come back from the machine, 16 MiB each. A stage whose process was killed before its
own export is exported from its last checkpoint there. ``scripts/gpu_campaign.sh`` runs both
under ``timeout`` so the command ends inside its budget whatever happens.

The stages (:func:`default_stages`) are the zoo's models at the settings they were trained with
on the CPU (README, "Model zoo"; the multi-style net as in ``runs/multistyle.log``), with the
paper's crop sizes and a batch of 32 (eight paper iterations' worth of images; the reports
count both). Why 32 (16 until the first lease): there (eager) the five stages' steps took 20-29
ms for 0.55-1.53 TFLOP of work, which fits ~16 ms per step whatever the batch (per-kernel
overhead) plus ~8 ms per TFLOP. At 32 the multi-style step should take ~41 ms instead of 26:
1.4x the images per second eagerly, with less noisy gradients late in a fine-tune (the GPU's
batch 16 moved the objective where the CPU's batch 4-8 had stalled), and once the CUDA graph
removes the overhead a fuller card still. The ~8 ms per TFLOP (~125 TFLOP/s at the margin) is
what the kernels themselves reach; where those milliseconds go is what ``profile.txt`` brings
back, and it decides the next change.

The shipped multi-style net is a cheap student distilled from a wider one and then trained on
the perceptual loss itself (README, "A quarter of the MACs, distilled"), so the campaign runs
the CPU's three steps: ``multistyle_wide`` (16/32/64, the perceptual loss) is the teacher,
``multistyle_distilled`` copies it into the small shape (``training distill``: no VGG, so its
steps are cheap), and ``multistyle`` continues from those weights on the perceptual loss: L1
to the teacher averages away the fine texture the Gram loss counts (on the CPU the distilled
net matched 8-25 L-BFGS iterations, 380 perceptual steps later 22-29). The teacher does not
ship (``Stage.ships``; the import keeps its tar under ``runs/`` for later students), the
distilled net does not come back at all (``Stage.packed``: its weights live on as the
fine-tune's start, and eight files is all a call returns), and each trains into a zoo of its
own (``Stage.zoo``): one zoo cannot offer the same style names twice.

That recipe starts from nothing, and a lease is minutes: its teacher gets about as many images
per style as the CPU's had, so the student it ends with would be about the one already shipped.
So where the shipped zoo (``--warm-zoo``, default ``model_zoo``, which travels with the tree)
holds a net a stage can start from (the same architecture; for the multi-style net the same
slots in the same order: :func:`warm_source`), the stage continues it instead: ``multistyle``
takes the three stages' time on the perceptual loss from the shipped student, and the SR nets
continue the shipped ones. Every GPU second then adds to what was trained before; the teacher
recipe remains for a pack whose styles the shipped net does not have (``--warm-zoo none``
forces it). Until the first lease (2026-12-04) the feature-loss SR nets restarted from this
campaign's pixel net every time, so their feature iterations could never add up across leases:
one lease's ~2k is not what BSD100's textures need.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from model_zoo.hardware import resolve_device
from model_zoo.manifest import read_manifest
from training.cli import build_parser, settings_from_args
from training.gpu.fastloop import (
    PROFILE_FILE,
    StageOptions,
    StageReport,
    graph_ignores_rate_changes,
    read_stage,
    train_stage,
    write_stage,
)
from training.gpu.pack import Pack
from training.loop import task_for
from training.schedule import check_decay_fractions
from training.settings import TrainSettings

log = logging.getLogger("training.gpu.campaign")

UNLIMITED = 10**9
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
TAR_LIMIT = MAX_FILE_BYTES - 256 * 1024
SUMMARY = "summary.json"
TEACHER = "multistyle_wide"
"""The 16/32/64 multi-style net the shipped student is distilled from (module docstring)."""
DISTILLED = "multistyle_distilled"
"""The student as distilled, before its perceptual fine-tune (module docstring)."""
OVERRIDES = "overrides.json"
RECIPE = "recipe.json"
"""The warm zoo the train step chose its stages with, so the export step sees the same ones."""
STUDENT_SHAPE = (
    "--channels", "8", "32", "32", "--num-residual", "5", "--outer-kernel", "5",
    "--decoder-channels", "16", "8",
)  # fmt: skip
"""The shipped multi-style net's shape (distill's defaults: 8/32/32, 5 residual blocks, 5x5,
16/8 decoder)."""


@dataclass(frozen=True)
class Stage:
    name: str
    argv: tuple[str, ...]
    """``python -m training`` arguments (the campaign adds data, zoo, run folder, resume)."""
    share: float
    """Share of the training budget (of what is left when the stage starts)."""
    zoo: str = "zoo"
    """The campaign folder's zoo the stage exports into (and takes ``--init-from`` from)."""
    ships: bool = True
    """False for a teacher: exported and packed (for later students), not merged into the
    shipped zoo by ``training.gpu.results import``."""
    packed: bool = True
    """False for an intermediate whose only use is the next stage's start: no tar of its own."""
    init_zoo: str | None = None
    """The zoo ``--init-from`` reads: a campaign folder's, or an absolute path (the warm zoo);
    None: ``zoo``."""
    feeds: str | None = None
    """The stage that starts from this one's weights: once that one has a checkpoint, this
    one is skipped on a resume (its time goes to the others)."""


def warm_source(argv: Sequence[str], warm_zoo: Path | None) -> bool:
    """Whether ``warm_zoo`` holds the model a stage (``argv``, named by its ``--name``) can
    continue: the same architecture and, for a multi-style net, the same slots in order (a
    table row trained for another painting would be a wrong start, not a warm one)."""
    if warm_zoo is None:
        return False
    try:
        manifest = read_manifest(warm_zoo)
    except (OSError, ValueError):
        return False
    name = argv[list(argv).index("--name") + 1]
    if name not in manifest.names():
        return False
    task = task_for(settings_from_args(build_parser().parse_args([*argv, "--data", "."])))
    return task.start_mismatch(manifest.get(name)) is None


def default_stages(
    pack: Pack, *, dry_run: bool = False, warm_zoo: Path | None = None
) -> list[Stage]:
    """The zoo at its CPU settings (module docstring); the rehearsal shrinks sizes only.
    ``warm_zoo``: continue the nets it holds where they fit (module docstring)."""
    styles = [f"{name}={pack.style_path(name)}" for name in pack.style_names]
    style_size, x4_size, x8_size, batch = (
        ("32", "32", "48", "2") if dry_run else ("256", "288", "288", "32")
    )
    # The perceptual objective as the CPU runs used it (README, "Training a style"): the
    # tables at 10x the learning rate, identity samples weighted 1e6, the saturation penalty.
    perceptual = (
        "multistyle", "--style-images", *styles, "--saturation-penalty", "1e4",
        "--conditional-lr-scale", "10", "--identity-weight", "1e6",
        "--image-size", style_size, "--batch-size", batch,
    )  # fmt: skip
    if dry_run:  # the 512 px style Grams are most of a CPU rehearsal's setup
        perceptual = (*perceptual, "--style-size", "64")
    teacher = (*perceptual, "--name", TEACHER, "--warmup", "2" if dry_run else "200")
    # The shipped shape at the CPU distillation's settings; the campaign adds --teacher-zoo.
    student = STUDENT_SHAPE
    distill = (
        "distill", "--teacher", TEACHER, "--name", DISTILLED, *student,
        "--warmup", "2" if dry_run else "100", "--saturation-penalty", "10",
        "--image-size", style_size, "--batch-size", batch,
    )  # fmt: skip
    # Then the perceptual loss from the distilled weights, at the CPU fine-tune's lr.
    fine_tune = (
        *perceptual, "--name", "multistyle", *student, "--init-from", DISTILLED,
        "--lr", "5e-4", "--warmup", "2" if dry_run else "50",
    )  # fmt: skip

    # Or the shipped student itself, on the same objective and lr (module docstring).
    continued = (*perceptual, "--name", "multistyle", *student, "--init-from", "multistyle",
                 "--lr", "5e-4", "--warmup", "2" if dry_run else "50")  # fmt: skip
    warm = str(warm_zoo.resolve()) if warm_zoo is not None else None

    def sr(factor: int, loss: str, size: str) -> Stage:
        name = f"x{factor}" if loss == "feat" else f"x{factor}_pixel"
        argv = (
            "sr", "--name", name, "--factor", str(factor), "--loss", loss,
            "--output", "bicubic_residual", "--lr", "1e-4",
            "--image-size", size, "--batch-size", batch,
        )  # fmt: skip
        share = 0.175 if loss == "feat" else 0.10
        if loss == "feat":
            # The grid penalty since session 20: the shipped x4 lost its LR-grid checkerboard
            # to it (1.8 -> 0.2 levels on BSD100) with LPIPS better on all three sets, and the
            # gate now refuses a net that grows the pattern back (README, "Evaluation").
            argv += ("--pixel-weight", "1e7", "--grid-weight", "1e9")
        if warm_source(argv, warm_zoo):  # the shipped net of this name (module docstring)
            return Stage(name, (*argv, "--init-from", name), share, init_zoo=warm)
        if loss == "feat":  # else from this campaign's pixel net
            argv += ("--init-from", f"x{factor}_pixel")
        return Stage(name, argv, share)

    if warm_source(continued, warm_zoo):
        # 60 % (46 % until the first lease): after it, the pixel SR nets are past their
        # targets and the style nets' loss equivalence is the farthest from its own.
        multistyle = [Stage("multistyle", continued, 0.60, zoo="zoo-slim", init_zoo=warm)]
    else:
        multistyle = [
            Stage(TEACHER, teacher, 0.33, ships=False),
            Stage(
                DISTILLED,
                distill,
                0.06,
                zoo="zoo-distill",
                ships=False,
                packed=False,
                feeds="multistyle",
            ),
            Stage("multistyle", fine_tune, 0.07, zoo="zoo-slim", init_zoo="zoo-distill"),
        ]
    return [
        *multistyle,
        sr(4, "pixel", x4_size),
        sr(4, "feat", x4_size),
        sr(8, "pixel", x8_size),
        sr(8, "feat", x8_size),
    ]


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what} expects NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def _has_checkpoint(work: Path, name: str) -> bool:
    return (work / "runs" / name / "checkpoint.safetensors").exists()


def stage_settings(
    stage: Stage, work: Path, pack: Pack, device: str, extra: Sequence[str]
) -> TrainSettings:
    """The stage's ``TrainSettings``, parsed by the trainer's own command line."""
    zoo, runs = work / stage.zoo, work / "runs"
    argv = [
        *stage.argv, "--data", pack.train_source, "--zoo", str(zoo), "--run-dir", str(runs),
        "--iterations", str(UNLIMITED), "--device", device, "--quiet", "--resume", *extra,
    ]  # fmt: skip
    if stage.argv[0] == "distill":  # the teacher is another stage's, in the main zoo
        argv += ["--teacher-zoo", str(work / "zoo")]
    source_zoo = work / (stage.init_zoo or stage.zoo)
    if stage.init_zoo:
        argv += ["--init-zoo", str(source_zoo)]
    settings = settings_from_args(build_parser().parse_args(argv))
    source = settings.init_from
    fresh = not _has_checkpoint(work, stage.name)
    if source and fresh and source not in read_manifest(source_zoo).names():
        log.warning("%s: %s was not trained; starting from scratch", stage.name, source)
        settings.init_from = None
    return settings


def train(args: argparse.Namespace) -> int:
    started = time.monotonic()
    budget = args.budget_s if args.deadline is None else args.deadline - time.time()
    end = started + budget
    pack = Pack.open(args.pack)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    warm_zoo = None if args.warm_zoo in ("", "none") else Path(args.warm_zoo).resolve()
    (work / RECIPE).write_text(json.dumps({"warm_zoo": str(warm_zoo) if warm_zoo else None}))
    stages = default_stages(pack, dry_run=args.dry_run, warm_zoo=warm_zoo)
    continued = [s.name for s in stages if s.init_zoo and Path(s.init_zoo).is_absolute()]
    log.info("continuing %s from %s", ", ".join(continued) or "nothing", warm_zoo)
    if any(s.name == TEACHER for s in stages):
        log.info("multistyle: the teacher recipe (no net in the warm zoo has this pack's slots)")
    if args.stages:
        wanted = args.stages.split(",")
        stages = [s for s in stages if s.name in wanted]
    shares = {k: float(v) for k, v in _pairs(args.share, "--share").items()}
    overrides: dict[str, list[str]] = {}
    for item in args.override:
        name, _, option = item.partition(":")
        overrides.setdefault(name, []).append(option)
    # The export step re-creates a killed stage's settings: it must see the same overrides.
    (work / OVERRIDES).write_text(json.dumps(overrides))
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log.info(
        "campaign on %s (%s; python %s, torch %s): %d stages, %.0f s",
        device, name, sys.version.split()[0], torch.__version__, len(stages), budget,
    )  # fmt: skip
    decay_at = tuple(args.lr_decay_at)
    if decay_at and device.type == "cuda" and not args.no_cuda_graphs:
        reason = graph_ignores_rate_changes(device)
        if reason:  # the graph is worth more than the decay: one rate, at full speed
            log.warning("budget lr decay off: the CUDA graph would not follow it (%s)", reason)
            decay_at = ()
    log.info(
        "lr decay: x%g at %s of each stage's training time", args.lr_decay_gamma,
        ", ".join(f"{at:.0%}" for at in decay_at) or "none (one rate)",
    )  # fmt: skip
    photos = pack.photos(device)
    vgg_state = pack.vgg_state_dict()
    log.info("pack decoded: %d photos, %.0f s", len(photos), time.monotonic() - started)
    failures = 0
    for i, stage in enumerate(stages):
        left = end - time.monotonic()
        weights = [shares.get(s.name, s.share) for s in stages[i:]]
        budget = left * weights[0] / sum(weights)
        if budget < args.min_stage_s:
            log.warning("%s: skipped, %.0f s left", stage.name, left)
            continue
        if stage.feeds and _has_checkpoint(work, stage.feeds):
            log.info("%s: skipped, %s already continues from it", stage.name, stage.feeds)
            continue
        options = StageOptions(
            budget_s=budget,
            reserve_s=args.reserve_s,
            cuda_graphs=not args.no_cuda_graphs,
            log_every=args.log_every,
            checkpoint_every_s=args.checkpoint_every_s,
            profile_s=args.profile_s,
            lr_decay_at=decay_at,
            lr_decay_gamma=args.lr_decay_gamma,
        )
        log.info("%s: %.0f s", stage.name, budget)
        try:
            settings = stage_settings(stage, work, pack, str(device), overrides.get(stage.name, []))
            report = train_stage(settings, pack, options, photos=photos, vgg_state=vgg_state)
            print(report.line(), flush=True)
        except Exception as exc:  # a stage's failure must not cost the others
            failures += 1
            log.error("%s failed: %s", stage.name, traceback.format_exc())
            previous = read_stage(work / "runs" / stage.name)
            report = previous or StageReport(stage.name, stage.argv[0])
            report.error = f"{type(exc).__name__}: {exc}"[:500]
            write_stage(work / "runs" / stage.name, report)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    log.info("training done in %.0f s (%d failed)", time.monotonic() - started, failures)
    return 1 if failures else 0


# ---------------------------------------------------------------------------------- export


def _needs_export(run: Path, zoo: Path) -> bool:
    """A checkpoint newer than the model exported from it (its process was killed)."""
    checkpoint = run / "checkpoint.safetensors"
    if not checkpoint.exists():
        return False
    report = read_stage(run)
    if report is None or not report.exported:
        return True
    weights = zoo / "weights" / f"{run.name}.safetensors"
    return not weights.exists() or weights.stat().st_mtime < checkpoint.stat().st_mtime


def _recorded_stages(work: Path, pack: Pack, dry_run: bool) -> dict[str, Stage]:
    """The stages as the train step chose them (its warm zoo recorded in ``RECIPE``)."""
    recipe = work / RECIPE
    warm = json.loads(recipe.read_text()).get("warm_zoo") if recipe.exists() else None
    stages = default_stages(pack, dry_run=dry_run, warm_zoo=Path(warm) if warm else None)
    return {stage.name: stage for stage in stages}


def _export_only(stage: Stage, work: Path, pack: Pack) -> None:
    name = stage.name
    path = work / OVERRIDES
    extra = json.loads(path.read_text()).get(name, []) if path.exists() else []
    for device in ("auto", "cpu"):  # a broken GPU context must not cost the model
        try:
            settings = stage_settings(stage, work, pack, device, extra)
            train_stage(settings, pack, StageOptions(budget_s=0, count_flops=False))
            log.info("%s: exported from its checkpoint (%s)", name, device)
            return
        except Exception:
            log.error("%s: export on %s failed: %s", name, device, traceback.format_exc())


def pack_model(name: str, work: Path, out: Path, zoo_name: str = "zoo") -> Path | None:
    """One tar per model: entry.json, weights, sample grids, loss curve, checkpoint, stage.json,
    the profile;
    the larger sample grids and then the checkpoint are left out if it would pass 16 MiB."""
    run, zoo = work / "runs" / name, work / zoo_name
    files: list[tuple[Path, str]] = []
    manifest = read_manifest(zoo)
    if name in manifest.names():
        entry = manifest.get(name)
        entry_path = run / "entry.json"
        entry_path.write_text(json.dumps(entry.model_dump(mode="json"), indent=1) + "\n")
        files += [(entry_path, "entry.json"), (zoo / entry.weights, entry.weights)]
    for path in sorted(run.glob("*")):
        if path.suffix in (".jpg", ".png", ".safetensors") or path.name in (
            "checkpoint.json", "stage.json", PROFILE_FILE,
        ):  # fmt: skip
            files.append((path, path.name))
    if not files:
        return None
    droppable = [f for f in files if f[1].startswith("samples_")]
    droppable += [f for f in files if f[1].startswith("checkpoint")]
    while sum(p.stat().st_size for p, _ in files) > TAR_LIMIT and droppable:
        dropped = droppable.pop(0)
        files.remove(dropped)
        log.warning("%s: %s left out of the tar (16 MiB per file)", name, dropped[1])
    target = out / f"{name}.tar"
    with tarfile.open(target, "w") as tar:
        for path, arcname in files:
            tar.add(path, arcname=f"{name}/{arcname}")
    return target


def export(args: argparse.Namespace) -> int:
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pack = Pack.open(args.pack)
    every_run = sorted(p for p in (work / "runs").glob("*") if p.is_dir())
    recorded = _recorded_stages(work, pack, args.dry_run)
    stages = {run.name: recorded.get(run.name) for run in every_run}
    zoos = {name: stage.zoo if stage else "zoo" for name, stage in stages.items()}
    runs = [run for run in every_run if stages[run.name] is None or stages[run.name].packed]
    for run in runs:
        stage = stages[run.name]
        if stage is not None and _needs_export(run, work / zoos[run.name]):
            _export_only(stage, work, pack)
    # The summary reports every stage, an unpacked one too (its sha256 is in the lineage).
    reports = {run.name: read_stage(run) for run in every_run}
    written = [pack_model(run.name, work, out, zoos[run.name]) for run in runs]
    summary: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "pack": pack.describe(),
        "dry_run": args.dry_run,
        "models": {k: asdict(v) if v else None for k, v in reports.items()},
        "teachers": sorted(
            n for n, stage in stages.items() if stage and not stage.ships and stage.packed
        ),
        "files": [p.name for p in written if p is not None],
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    print("model        iterations                                   speed")
    for report in reports.values():
        if report is not None:
            print(report.line())
    count = len([p for p in out.iterdir() if p.is_file()])
    if count > MAX_FILES:
        log.error("%s holds %d files; only %d come back", out, count, MAX_FILES)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(
        prog="python -m training.gpu.campaign",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "export"):
        p = sub.add_parser(name)
        p.add_argument("--pack", default=".pack")
        p.add_argument("--work", default=".campaign", help="runs and zoo (kept for a resume)")
        p.add_argument("--dry-run", action="store_true", help="the CPU rehearsal's sizes")
    t = sub.choices["train"]
    when = t.add_mutually_exclusive_group(required=True)
    when.add_argument("--budget-s", type=float, help="seconds for all training stages")
    when.add_argument(
        "--deadline", type=float, help="Unix time by which training ends (startup included)"
    )
    t.add_argument("--device", default="auto")
    t.add_argument(
        "--warm-zoo",
        default="model_zoo",
        help="continue the nets this zoo holds where they fit (module docstring); none: never",
    )
    t.add_argument("--stages", default="", help="comma list (default: all)")
    t.add_argument("--share", nargs="*", default=[], metavar="NAME=F")
    t.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="NAME:--OPTION=VALUE",
        help="a training option for one stage, e.g. multistyle:--batch-size=32",
    )
    t.add_argument("--reserve-s", type=float, default=12.0, help="per stage, for its export")
    t.add_argument("--min-stage-s", type=float, default=20.0)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--checkpoint-every-s", type=float, default=60.0)
    t.add_argument(
        "--profile-s",
        type=float,
        default=4.0,
        help="per stage, for profiling its last steps into profile.txt (0: none)",
    )
    t.add_argument("--no-cuda-graphs", action="store_true")
    t.add_argument(
        "--lr-decay-at",
        type=float,
        nargs="*",
        default=[0.6, 0.85],
        metavar="F",
        help="fractions of each stage's training time from which its rate is --lr-decay-gamma "
        "times lower once more (none: one rate; training/schedule.py)",
    )
    t.add_argument("--lr-decay-gamma", type=float, default=0.3)
    sub.choices["export"].add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "train":
        try:
            check_decay_fractions(args.lr_decay_at, args.lr_decay_gamma)
        except ValueError as exc:
            parser.error(str(exc))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return train(args) if args.command == "train" else export(args)


if __name__ == "__main__":
    sys.exit(main())

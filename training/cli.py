"""``python -m training TASK ...``: train a transform net and write it into the zoo.

One subcommand per model family (``training.tasks.TASKS``); the options every family shares are
defined once here. ``--resume`` continues a run from its checkpoint (and may change the learning
rate or the loss weights: each change is recorded as a phase); Ctrl-C stops after the current
step and still exports what was trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from model_zoo.hardware import PRECISIONS
from training.loop import train
from training.schedule import check_milestones
from training.settings import TrainSettings
from training.tasks import TASKS

# Parsed options that steer the run without being part of what is trained.
_EXTRA = ("resume", "export_only", "workers", "quiet")


def _common(parser: argparse.ArgumentParser, size: int, iterations: int) -> None:
    parser.add_argument("--name", required=True, help="zoo model name, e.g. mosaic or x4")
    parser.add_argument("--data", required=True, help="folder tree of training photos")
    parser.add_argument("--image-size", type=int, default=size, help="training crop size (px)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=iterations)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tv-weight", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1"
    )
    parser.add_argument("--precision", default="auto", choices=list(PRECISIONS))
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=10, help="progress-bar refresh (its)")
    parser.add_argument("--run-dir", default="runs", help="checkpoints, samples, loss curve")
    parser.add_argument("--zoo", default=None, help="zoo folder (default: $MODEL_ZOO_DIR or ours)")
    parser.add_argument("--vgg-weights", default=None, help="explicit VGG-16 weights file")
    parser.add_argument(
        "--upsample", default="nearest+conv", choices=["nearest+conv", "transposed"]
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="write the run's checkpoint into --zoo and stop, training nothing and touching "
        "nothing in the run folder (safe beside the run that is still training it); with "
        "--ema-decay the average is exported where the checkpoint has one",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--init-from", default=None, help="start from this zoo model's weights")
    parser.add_argument(
        "--init-zoo", default=None, help="the zoo holding the --init-from model (default: --zoo)"
    )
    parser.add_argument(
        "--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off)"
    )
    parser.add_argument(
        "--warmup", type=int, default=0, help="linear lr warm-up iterations (0: off)"
    )
    parser.add_argument(
        "--lr-milestones",
        type=int,
        nargs="+",
        default=(),
        metavar="ITERATION",
        help="multiply the lr by --lr-gamma from each of these iterations on, e.g. 2000 4000",
    )
    parser.add_argument(
        "--lr-gamma", type=float, default=0.1, help="the lr's factor at each milestone"
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="export the weights' moving average with this decay per step, e.g. 0.999 (0: off)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subcommands = parser.add_subparsers(dest="task", required=True)
    for name, task in TASKS.items():
        sub = subcommands.add_parser(name, help=task.help, description=task.__doc__)
        _common(sub, task.default_image_size, task.default_iterations)
        task.add_arguments(sub)
    return parser


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    values = vars(args).copy()
    extra = {k: values.pop(k) for k in _EXTRA}
    return TASKS[values["task"]].settings_from_values(values | {"extra": extra})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_milestones(args.lr_milestones, args.lr_gamma)
    except ValueError as exc:
        parser.error(str(exc))  # exit 2 with the usage, before the loss network is read
    settings = settings_from_args(args)
    entry = train(settings)
    print(json.dumps({"name": entry.name, "iterations": entry.iterations, "sha256": entry.sha256}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m evaluation sr|style|gallery``: evaluate the zoo the way the paper did.

``sr --models x4 x4_pixel x8 --sets Set5 Set14 BSD100 --data DIR``
    PSNR / SSIM (Y channel) and LPIPS-VGG for bicubic and each model (``evaluation.sr``).
``style --models mosaic candy --photos DIR --sizes 256 512``
    feed-forward output against L-BFGS optimisation of the same objective
    (``evaluation.style``).
``gallery``
    the pictures in ``docs/`` that show what the zoo does (``evaluation.gallery``).
``gate --model multistyle --candidate-zoo DIR``
    would DIR's net replace the zoo's of that name? (``evaluation.gate``, what imports and
    promotions ask; exit 1 when it would be refused).

Results go into the manifest's ``metrics`` and a Markdown table. Iteration counts, image counts
and precisions are options so a short version runs on a CPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from evaluation import gallery
from evaluation.common import (
    DEFAULT_SR_DATA,
    EvalError,
    load_styles,
    protocol_record,
    write_outputs,
)
from evaluation.droplets import droplets_markdown, evaluate_droplets, store_droplet_metrics
from evaluation.gate import DEFAULT_GATE_PHOTOS, GateSettings, check_replacement
from evaluation.sr import (
    evaluate_sr,
    sr_markdown,
    store_default_upscalers,
    store_sr_metrics,
    summarise_sr,
)
from evaluation.style import (
    DEFAULT_CHECKPOINTS,
    DEFAULT_STYLE_PHOTOS,
    evaluate_style,
    store_style_metrics,
    style_markdown,
)
from model_zoo.hardware import auto_precision
from model_zoo.manifest import read_manifest, zoo_dir
from training.data import find_images

log = logging.getLogger("evaluation")


def _parse_style_images(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--style-image expects NAME=PATH, got {item!r}")
        out[name] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = parser.add_subparsers(dest="task", required=True)

    def common(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--zoo", default=None, help="zoo folder (default: $MODEL_ZOO_DIR or ours)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
        p.add_argument("--out", default=out, help="Markdown file to write ('-' for stdout only)")
        p.add_argument("--json", default=None, help="also write every per-image result here")
        p.add_argument("--no-store", action="store_true", help="do not write into the manifest")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    sr = tasks.add_parser("sr", help="PSNR / SSIM / LPIPS on SR benchmarks")
    common(sr, "docs/eval_sr.md")
    sr.add_argument("--models", nargs="+", default=["x4", "x4_pixel", "x8"])
    sr.add_argument("--sets", nargs="+", default=["Set5", "Set14", "BSD100"])
    sr.add_argument("--data", type=Path, default=DEFAULT_SR_DATA, help="folder holding the sets")
    sr.add_argument("--limit", type=int, default=None, help="at most N images per set")
    sr.add_argument(
        "--degradation",
        default="train",
        choices=["train", "bicubic"],
        help="LR making: the training degradation (default) or plain bicubic",
    )
    sr.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="SR model forward precision"
    )
    sr.add_argument(
        "--lpips-precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="LPIPS backbone precision (bf16: 1.4x faster on a CPU with native bf16, LPIPS "
        "within ~5e-4 of fp32; auto picks it only there)",
    )

    sr.add_argument(
        "--lpips-without-grid",
        action="store_true",
        help="also LPIPS with each output's LR-grid pattern removed (how much it earns)",
    )

    st = tasks.add_parser("style", help="feed-forward vs L-BFGS optimisation (Gatys et al.)")
    common(st, "docs/eval_style.md")
    st.add_argument("--models", nargs="+", default=None, help="default: every style model")
    st.add_argument(
        "--photos",
        type=Path,
        default=DEFAULT_STYLE_PHOTOS,
        help="held-out photos (default: BSD100, disjoint from the training set)",
    )
    st.add_argument("--num-photos", type=int, default=5)
    st.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    st.add_argument(
        "--iterations",
        nargs="+",
        type=int,
        default=list(DEFAULT_CHECKPOINTS),
        help="L-BFGS iteration counts to report (runs to the largest)",
    )
    st.add_argument("--init", default="noise", choices=["noise", "content"])
    st.add_argument(
        "--line-search",
        default=None,
        choices=["strong_wolfe"],
        help="L-BFGS line search (default none: one evaluation per iteration)",
    )
    st.add_argument("--ff-repeats", type=int, default=5, help="timed feed-forward runs")
    st.add_argument(
        "--style-image",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="override a model's recorded style image path",
    )
    dr = tasks.add_parser("droplets", help="count droplets (blown-out blobs) per style")
    common(dr, "docs/eval_droplets.md")
    dr.add_argument("--models", nargs="+", default=None, help="styles or models (default: all)")
    dr.add_argument("--photos", type=Path, default=DEFAULT_STYLE_PHOTOS, help="held-out photos")
    dr.add_argument("--num-photos", type=int, default=10)
    dr.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="longer side (px)")
    dr.add_argument("--examples", type=Path, default=None, help="save each worst case, marked")

    gate = tasks.add_parser("gate", help="is a new net not worse than the zoo's of its name?")
    gate.add_argument("--model", required=True, help="the model name in both zoos")
    gate.add_argument("--candidate-zoo", type=Path, required=True, help="zoo holding the new net")
    gate.add_argument("--zoo", type=Path, default=None, help="the shipped zoo (default: ours)")
    gate.add_argument("--photos", type=Path, default=DEFAULT_GATE_PHOTOS, help="held-out photos")
    gate.add_argument("--style-size", type=int, default=GateSettings.style_size)
    gate.add_argument("--droplet-size", type=int, default=GateSettings.droplet_size)
    gate.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    pictures = tasks.add_parser(
        "gallery", help="the gallery pictures in docs/", description=gallery.__doc__
    )
    gallery.add_arguments(pictures)
    return parser


def _report_kept(kept: list[str]) -> None:
    """A partial run keeps the fuller stored numbers; say so, or the operator would believe the
    manifest now holds this run's."""
    for what in kept:
        print(
            f"{what}: stored numbers kept (measured on more images than this run)", file=sys.stderr
        )


def run(args: argparse.Namespace) -> int:
    if args.task == "gallery":
        return gallery.run(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.task == "gate":
        verdict = check_replacement(
            args.model,
            args.candidate_zoo,
            zoo_dir(args.zoo),
            GateSettings(
                photos=args.photos, style_size=args.style_size, droplet_size=args.droplet_size
            ),
        )
        for comparison in verdict.comparisons:
            print(comparison.line())
        print(f"{args.model}: {'accepted' if verdict.accepted else 'REFUSED'}: {verdict.reason()}")
        return 0 if verdict.accepted else 1
    device = torch.device(args.device)
    protocol = protocol_record(device)
    if args.task == "droplets":
        styles = load_styles(args.models, args.zoo, device)
        photos = find_images(args.photos)[: args.num_photos]
        results = evaluate_droplets(styles, photos, args.sizes, examples=args.examples)
        protocol |= {"photos": str(args.photos), "num_photos": len(photos), "precision": "fp32"}
        if not args.no_store:
            _report_kept(store_droplet_metrics(results, args.zoo, protocol))
        write_outputs(droplets_markdown(results), args.out, results, args.json)
        return 0
    if args.task == "sr":
        lpips_precision = (
            auto_precision(device, "bf16")
            if args.lpips_precision == "auto"
            else args.lpips_precision
        )
        rows = evaluate_sr(
            args.models,
            args.sets,
            args.data,
            root=args.zoo,
            limit=args.limit,
            device=device,
            precision=args.precision,
            lpips_precision=lpips_precision,
            degradation=args.degradation,
            lpips_without_grid=args.lpips_without_grid,
        )
        summary = summarise_sr(rows)
        protocol |= {
            "y": "BT.601",
            "border": "factor",
            "modcrop": True,
            "lr": f"{args.degradation} degradation, uint8",
            "bicubic": "PIL BICUBIC",
            "lpips": f"vgg ({lpips_precision})",
            "precision": args.precision,
            "data": str(args.data),
        }
        if not args.no_store:
            # Plain-bicubic LR is a side protocol: it must not replace the main numbers.
            key = "sr" if args.degradation == "train" else "sr_bicubic_lr"
            protocol |= {"limit": args.limit} if args.limit else {}
            _report_kept(store_sr_metrics(summary, args.models, args.zoo, protocol, key))
            if key == "sr":
                for reason in store_default_upscalers(args.zoo):
                    print(f"default upscaler {reason}", file=sys.stderr)
        write_outputs(sr_markdown(summary), args.out, [asdict(r) for r in rows], args.json)
        return 0

    models = args.models or sorted(read_manifest(args.zoo).styles())
    if not models:
        raise EvalError("no styles to evaluate")
    results = evaluate_style(
        models,
        args.photos,
        args.sizes,
        root=args.zoo,
        num_photos=args.num_photos,
        checkpoints=args.iterations,
        init=args.init,
        line_search=args.line_search,
        ff_repeats=args.ff_repeats,
        device=device,
        style_images=_parse_style_images(args.style_image),
    )
    protocol |= {
        "photos": str(args.photos),
        "num_photos": args.num_photos,
        "init": args.init,
        "optimizer": f"L-BFGS (line search: {args.line_search or 'none'}), fp32",
        "ff_precision": "fp32",
    }
    if not args.no_store:
        _report_kept(store_style_metrics(results, args.zoo, protocol))
    write_outputs(style_markdown(results, args.iterations), args.out, results, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (EvalError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

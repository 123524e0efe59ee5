"""Evaluate the zoo the way the paper did; results go into the manifest and a Markdown table.

``python -m model_zoo.eval sr --models x4 x4_pixel x8 --sets Set5 Set14 BSD100 --data DIR``
    PSNR / SSIM (Y channel, BT.601, border of f px, modcropped HR) and LPIPS-VGG for bicubic and
    each model. LR inputs are made with the training pipeline's own degradation
    (``model_zoo.data.degrade``: Gaussian blur sigma 1.0, then antialiased bicubic downsampling)
    and stored as 8-bit images, as a user's LR upload would be; every method gets that same LR
    image. The bicubic baseline upscales it with PIL BICUBIC (MATLAB's a = -0.5 kernel, see
    ``model_zoo.metrics``). LPIPS is computed on the same border-cropped RGB images.

``python -m model_zoo.eval style --models mosaic candy --photos DIR --sizes 256 512``
    On held-out photos (default: BSD100, the BSDS500 val split, disjoint from ``train/``;
    Set5/Set14 are held out too, Kodak in ``train/`` is not), each centre-cropped to a square
    and resized to each size: the joint objective of the feed-forward output, the objective of
    the Gatys et al. baseline (``model_zoo.gatys``) after 50/100/200/300 L-BFGS iterations, the
    first iteration at which the baseline reaches the feed-forward objective, and the time
    ratio (baseline time to get there / feed-forward time), both timed in fp32 on this machine
    in this process. The feed-forward time is the median of several warm runs.

Precision: SR models run in fp32 (``--precision bf16`` to change), LPIPS's VGG in bf16 autocast
(about 1.4x faster on CPU, within ~5e-4 of fp32; ``--lpips-precision fp32``); the style
comparison is all fp32 (L-BFGS needs it, and both sides are timed alike).

Iteration counts, image counts and precisions are options so a short version runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from model_zoo import registry
from model_zoo.apply import run_model
from model_zoo.data import degrade, find_images
from model_zoo.gatys import (
    Init,
    JointObjective,
    objective_for,
    settings_from_entry,
    style_targets,
    stylize,
)
from model_zoo.hardware import auto_precision
from model_zoo.imaging import load_rgb, to_image, to_tensor
from model_zoo.lpips import LPIPS
from model_zoo.manifest import ModelEntry
from model_zoo.metrics import bicubic_upscale, modcrop, sr_scores
from model_zoo.train import TrainSettings, hardware_description
from model_zoo.vgg import VGG16Features

log = logging.getLogger("model_zoo.eval")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SR_DATA = REPO_ROOT.parent / "shared" / "data" / "sr_bench"
DEFAULT_STYLE_PHOTOS = DEFAULT_SR_DATA / "BSD100"
DEFAULT_CHECKPOINTS = (50, 100, 200, 300)

# PAPER.md, x4 PSNR / SSIM (approx.): bicubic, l_pixel, SRCNN, l_feat.
PAPER_X4 = {
    "Set5": {"bicubic": (28.43, 0.811), "l_pixel": (28.40, 0.810), "l_feat": (27.09, 0.768)},
    "Set14": {"bicubic": (25.99, 0.730), "l_pixel": (25.96, 0.730), "l_feat": (24.99, 0.673)},
    "BSD100": {"bicubic": (25.96, 0.682), "l_pixel": (25.75, 0.699), "l_feat": (24.95, 0.632)},
}


class EvalError(ValueError):
    """Bad evaluation request (unknown model, wrong kind, missing data): exit 2, no traceback."""


def _autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load(
    name: str, kind: str, root: str | None, device: torch.device
) -> tuple[nn.Module, ModelEntry]:
    try:
        net, entry = registry.load_model(name, root=root, device=device)
    except (registry.ModelNotFoundError, registry.WeightsIntegrityError) as exc:
        raise EvalError(str(exc)) from None
    if entry.kind != kind:
        raise EvalError(f"{name!r} is a {entry.kind} model; this evaluation needs {kind} models")
    return net, entry


def _sr_factor(entry: ModelEntry) -> int:
    return int(entry.factor or entry.arch.factor)  # type: ignore[union-attr]


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


# --------------------------------------------------------------------------- super-resolution


@dataclass
class SRRow:
    set: str
    image: str
    factor: int
    method: str
    psnr: float
    ssim: float
    lpips: float


def benchmark_images(data: Path, set_name: str, limit: int | None) -> list[Path]:
    folder = data / set_name
    if not folder.is_dir():
        raise EvalError(f"benchmark set {set_name!r} not found at {folder}")
    files = find_images(folder)
    return files[:limit] if limit else files


def evaluate_sr(
    models: Sequence[str],
    sets: Sequence[str],
    data: Path,
    *,
    root: str | None = None,
    limit: int | None = None,
    device: torch.device | None = None,
    precision: str = "fp32",
    lpips_precision: str = "auto",
    lpips_model: LPIPS | None = None,
    degradation: str = "train",
) -> list[SRRow]:
    """Score bicubic and every model on every image; one row per (image, factor, method)."""
    device = device or torch.device("cpu")
    if lpips_precision == "auto":
        lpips_precision = auto_precision(device, "bf16")
    nets: dict[int, list[tuple[str, nn.Module]]] = {}
    for name in models:
        net, entry = _load(name, "sr", root, device)
        nets.setdefault(_sr_factor(entry), []).append((name, net))
    metric = (lpips_model or LPIPS()).to(device)
    rows: list[SRRow] = []
    for set_name in sets:
        for path in benchmark_images(data, set_name, limit):
            original = load_rgb(path)
            for factor, factor_nets in sorted(nets.items()):
                hr = modcrop(original, factor)
                lr = make_lr(hr, factor, degradation)
                outputs = {"bicubic": bicubic_upscale(lr, factor)}
                lr_tensor = to_tensor(lr)
                for name, net in factor_nets:
                    outputs[name] = to_image(run_model(net, lr_tensor, precision))
                with torch.inference_mode(), _autocast(device, lpips_precision):
                    ref = metric.features_of(_shaved_tensor(hr, factor, device))
                    for method, output in outputs.items():
                        scores = sr_scores(output, hr, factor)
                        feats = metric.features_of(_shaved_tensor(output, factor, device))
                        distance = float(metric.distance(feats, ref)[0])
                        rows.append(
                            SRRow(set_name, path.name, factor, method, **scores, lpips=distance)
                        )
            log.info("sr %s/%s done", set_name, path.name)
    return rows


def make_lr(hr: Image.Image, factor: int, degradation: str = "train") -> Image.Image:
    """The 8-bit LR input. ``train``: the training degradation (blur sigma 1 + bicubic), what
    the models expect; ``bicubic``: plain bicubic downsampling (PIL, MATLAB-like kernel), the
    SR literature's protocol behind the paper's bicubic column (Set5 x4: 28.43 / 0.811)."""
    if degradation == "train":
        return to_image(degrade(to_tensor(hr), factor))
    if degradation == "bicubic":
        size = (hr.width // factor, hr.height // factor)
        return hr.resize(size, Image.Resampling.BICUBIC)
    raise EvalError(f"unknown degradation {degradation!r}; use 'train' or 'bicubic'")


def _shaved_tensor(img: Image.Image, border: int, device: torch.device) -> torch.Tensor:
    w, h = img.size
    return to_tensor(img.crop((border, border, w - border, h - border))).to(device)


def summarise_sr(rows: Sequence[SRRow]) -> dict[int, dict[str, dict[str, dict[str, float]]]]:
    """factor -> set -> method -> mean psnr / ssim / lpips and image count."""
    groups: dict[tuple[int, str, str], list[SRRow]] = {}
    for row in rows:
        groups.setdefault((row.factor, row.set, row.method), []).append(row)
    out: dict[int, dict[str, dict[str, dict[str, float]]]] = {}
    for (factor, set_name, method), items in groups.items():
        out.setdefault(factor, {}).setdefault(set_name, {})[method] = {
            "psnr": statistics.fmean(r.psnr for r in items),
            "ssim": statistics.fmean(r.ssim for r in items),
            "lpips": statistics.fmean(r.lpips for r in items),
            "images": len(items),
        }
    return out


def sr_markdown(summary: dict[int, dict[str, dict[str, dict[str, float]]]]) -> str:
    lines = [
        "PSNR (dB) / SSIM on Y (BT.601), border of f px cropped, HR modcropped; "
        "LPIPS-VGG (lower is better) on the same crop.",
        "",
    ]
    for factor, sets in sorted(summary.items()):
        methods = list(next(iter(sets.values())).keys())
        header = ["set", *[f"{m} PSNR / SSIM / LPIPS" for m in methods]]
        paper = factor == 4
        if paper:
            header += ["paper bicubic", "paper l_pixel", "paper l_feat"]
        lines += [f"### x{factor}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for set_name, by_method in sets.items():
            n = int(next(iter(by_method.values()))["images"])
            cells = [f"{set_name} ({n})"]
            for m in methods:
                s = by_method[m]
                cells.append(f"{_fmt(s['psnr'], 2)} / {_fmt(s['ssim'], 3)} / {_fmt(s['lpips'], 3)}")
            if paper:
                ref = PAPER_X4.get(set_name, {})
                for key in ("bicubic", "l_pixel", "l_feat"):
                    cells.append(f"{ref[key][0]:.2f} / {ref[key][1]:.3f}" if key in ref else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def store_sr_metrics(
    summary: dict[int, dict[str, dict[str, dict[str, float]]]],
    models: Sequence[str],
    root: str | None,
    protocol: dict[str, Any],
    key: str = "sr",
) -> None:
    """Each model gets its own scores per set, with bicubic beside them for reference."""
    for name in models:
        entry = registry.get_entry(name, root)
        factor = _sr_factor(entry)
        per_set = {
            set_name: {**by_method[name], "bicubic": by_method["bicubic"]}
            for set_name, by_method in summary.get(factor, {}).items()
            if name in by_method
        }
        registry.update_metrics(name, {key: {"protocol": protocol, "sets": per_set}}, root)


# --------------------------------------------------------------------------- style transfer


def square_photo(img: Image.Image, size: int) -> Image.Image:
    """Centre square crop, resized to ``size`` (the paper evaluates at 256/512/1024 squares)."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    square = img.crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.Resampling.BICUBIC)


def time_forward(net: nn.Module, x: torch.Tensor, repeats: int, precision: str = "fp32") -> float:
    """Median wall time of warm forward passes (the first run is discarded as warm-up)."""
    device = x.device
    run_model(net, x, precision)
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        run_model(net, x, precision)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate_style_one(
    net: nn.Module,
    settings: TrainSettings,
    photo: Image.Image,
    vgg: VGG16Features,
    *,
    checkpoints: Sequence[int],
    init: Init,
    seed: int,
    line_search: str | None = None,
    ff_repeats: int,
    device: torch.device,
    style_grams: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The paper's comparison for one (style model, photo, size)."""
    content = to_tensor(photo).to(device)
    objective = objective_for(settings, content, vgg, style_grams)
    output = run_model(net, content, "fp32")
    ff_objective = objective.value(output)
    ff_time = time_forward(net, content, ff_repeats)
    # For information: how the service may run it. The ratio uses the fp32 time (like for like).
    # Emulated bf16 (no native instructions) is ~50x slower than fp32 and not what anyone serves.
    ff_time_bf16 = (
        time_forward(net, content, ff_repeats, "bf16")
        if auto_precision(device, "bf16") == "bf16"
        else None
    )
    result = stylize(objective, max(checkpoints), init=init, seed=seed, line_search=line_search)
    match = result.iterations_to_reach(ff_objective)
    return {
        "ff_objective": ff_objective,
        "ff_terms": {k: float(v) for k, v in _terms(objective, output).items()},
        "ff_time_s": ff_time,
        "ff_time_bf16_s": ff_time_bf16,
        "baseline_objective": {str(k): result.objectives[k] for k in checkpoints},
        "baseline_time_s": {str(k): result.times[k] for k in checkpoints},
        "match_iteration": match,
        "match_time_s": result.times[match] if match is not None else None,
        "time_ratio": result.times[match] / ff_time if match is not None else None,
    }


def _terms(objective: JointObjective, image: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return objective.terms(image)


def summarise_style(
    per_photo: Sequence[dict[str, Any]], checkpoints: Sequence[int]
) -> dict[str, Any]:
    """Means over photos; the match iteration as a median with how many photos reached it."""
    n = len(per_photo)
    matched = [p for p in per_photo if p["match_iteration"] is not None]
    iters = sorted(p["match_iteration"] for p in matched)
    median_match: float | None = None
    if len(matched) * 2 > n:  # more than half reached it: the median is a real iteration count
        median_match = statistics.median(iters + [math.inf] * (n - len(matched)))
    ff_time = statistics.fmean(p["ff_time_s"] for p in per_photo)
    return {
        "photos": n,
        "ff_objective": statistics.fmean(p["ff_objective"] for p in per_photo),
        "ff_time_s": ff_time,
        "baseline_objective": {
            str(k): statistics.fmean(p["baseline_objective"][str(k)] for p in per_photo)
            for k in checkpoints
        },
        "baseline_time_s": {
            str(k): statistics.fmean(p["baseline_time_s"][str(k)] for p in per_photo)
            for k in checkpoints
        },
        "matched": len(matched),
        "match_iteration_median": median_match,
        "time_ratio_mean": statistics.fmean(p["time_ratio"] for p in matched) if matched else None,
        "speedup": {
            str(k): statistics.fmean(
                p["baseline_time_s"][str(k)] / p["ff_time_s"] for p in per_photo
            )
            for k in checkpoints
        },
    }


def evaluate_style(
    models: Sequence[str],
    photos: Path,
    sizes: Sequence[int],
    *,
    root: str | None = None,
    num_photos: int = 5,
    checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS,
    init: Init = "noise",
    line_search: str | None = None,
    ff_repeats: int = 5,
    device: torch.device | None = None,
    style_images: dict[str, str] | None = None,
    vgg: VGG16Features | None = None,
) -> dict[str, dict[str, Any]]:
    """model -> size -> {"summary": ..., "per_photo": [...]}."""
    device = device or torch.device("cpu")
    checkpoints = sorted(set(checkpoints))
    if not checkpoints or checkpoints[0] < 1:
        raise EvalError("iteration checkpoints must be positive integers")
    paths = find_images(photos)[:num_photos]
    vgg = (vgg or VGG16Features()).to(device)
    results: dict[str, dict[str, Any]] = {}
    for name in models:
        net, entry = _load(name, "style", root, device)
        try:
            settings = settings_from_entry(entry, (style_images or {}).get(name))
        except (ValueError, FileNotFoundError) as exc:
            raise EvalError(str(exc)) from None
        grams = style_targets(settings, vgg)  # once per style, not per photo
        results[name] = {}
        for size in sizes:
            per_photo = []
            for index, path in enumerate(paths):
                photo = square_photo(load_rgb(path), size)
                one = evaluate_style_one(
                    net,
                    settings,
                    photo,
                    vgg,
                    checkpoints=checkpoints,
                    init=init,
                    line_search=line_search,
                    style_grams=grams,
                    seed=index,
                    ff_repeats=ff_repeats,
                    device=device,
                )
                one["photo"] = path.name
                per_photo.append(one)
                log.info(
                    "style %s %dpx %s: ff %.4g, match at %s",
                    name,
                    size,
                    path.name,
                    one["ff_objective"],
                    one["match_iteration"],
                )
            results[name][str(size)] = {
                "summary": summarise_style(per_photo, checkpoints),
                "per_photo": per_photo,
            }
    return results


def style_markdown(results: dict[str, dict[str, Any]], checkpoints: Sequence[int]) -> str:
    checkpoints = sorted(set(checkpoints))
    top = max(checkpoints)
    ref_its = 100 if 100 in checkpoints else top  # the paper quotes the speed-up at 100 its
    header = [
        "style",
        "size",
        "photos",
        "feed-forward objective",
        *[f"L-BFGS {k} its" for k in checkpoints],
        "its to match (median)",
        "matched",
        "feed-forward s",
        f"L-BFGS {top} its s",
        f"speed-up vs {ref_its} its",
        "time ratio at match",
    ]
    lines = [
        "Joint objective (content + style + TV, the trainer's weights), mean over photos; "
        "the baseline is L-BFGS on the pixels with the same objective.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, by_size in results.items():
        for size, block in by_size.items():
            s = block["summary"]
            match = s["match_iteration_median"]
            match_cell = f">{top}" if match is None or math.isinf(match) else f"{match:g}"
            ratio = s["time_ratio_mean"]
            cells = [
                name,
                size,
                str(s["photos"]),
                f"{s['ff_objective']:.4g}",
                *[f"{s['baseline_objective'][str(k)]:.4g}" for k in checkpoints],
                match_cell,
                f"{s['matched']}/{s['photos']}",
                f"{s['ff_time_s']:.3f}",
                f"{s['baseline_time_s'][str(top)]:.1f}",
                f"{s['speedup'][str(ref_its)]:.0f}x",
                "-" if ratio is None else f"{ratio:.0f}x",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def store_style_metrics(
    results: dict[str, dict[str, Any]], root: str | None, protocol: dict[str, Any]
) -> None:
    """Merge by size: a later 512 px run must not erase the 256 px results (and vice versa).

    Each size keeps the protocol it was measured under, since runs at different sizes may come
    from different sessions and machines.
    """
    for name, by_size in results.items():
        previous = registry.get_entry(name, root).metrics.get("style_vs_optimization", {})
        sizes = {
            size: {"protocol": previous.get("protocol", {}), **result}
            for size, result in previous.get("sizes", {}).items()
        }
        sizes.update({size: {**result, "protocol": protocol} for size, result in by_size.items()})
        registry.update_metrics(
            name, {"style_vs_optimization": {"protocol": protocol, "sizes": sizes}}, root
        )


# --------------------------------------------------------------------------- CLI


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
        prog="python -m model_zoo.eval",
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
    return parser


def _protocol(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return {
        "hardware": hardware_description(device),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _write(text: str, out: str, payload: Any, json_path: str | None) -> None:
    print(text)
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        log.info("wrote %s", out)
    if json_path:
        Path(json_path).write_text(json.dumps(payload, indent=1, default=str))


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    protocol = _protocol(args, device)
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
            store_sr_metrics(summary, args.models, args.zoo, protocol, key)
        _write(sr_markdown(summary), args.out, [asdict(r) for r in rows], args.json)
        return 0

    models = args.models or [e.name for e in registry.list_models(args.zoo) if e.kind == "style"]
    if not models:
        raise EvalError("no style models to evaluate")
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
        store_style_metrics(results, args.zoo, protocol)
    _write(style_markdown(results, args.iterations), args.out, results, args.json)
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

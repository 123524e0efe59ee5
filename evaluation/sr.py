"""Super-resolution as the paper measured it, plus LPIPS.

PSNR and SSIM on the Y channel (BT.601, border of f px cropped, HR modcropped), LPIPS-VGG and
the LR-grid pattern (``evaluation.metrics.grid_levels``: the checkerboard a feature-loss net can
paint, which neither PSNR nor LPIPS registers) for bicubic and each model. LR inputs are made
with the training pipeline's own degradation (``training.data.degrade``: Gaussian blur sigma
1.0, then antialiased bicubic downsampling) and stored as 8-bit images, as a user's LR upload
would be; every method gets that same LR image. The bicubic baseline upscales it with PIL
BICUBIC (MATLAB's a = -0.5 kernel, see ``evaluation.metrics``). LPIPS is computed on the same
border-cropped RGB images.

Precision: SR models run in fp32 (``--precision bf16`` to change), LPIPS's VGG in bf16 autocast
(about 1.4x faster on CPU, within ~5e-4 of fp32; ``--lpips-precision fp32``).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from evaluation.common import EvalError, fmt, load_model_of_kind, merge_measurements
from evaluation.lpips import LPIPS
from evaluation.metrics import bicubic_upscale, modcrop, sr_scores, without_grid
from model_zoo import registry
from model_zoo.hardware import auto_precision, autocast
from model_zoo.imaging import load_rgb, to_image, to_tensor
from model_zoo.manifest import Manifest, ModelEntry, read_manifest, write_manifest
from model_zoo.reference import run_model
from training.data import degrade, find_images

log = logging.getLogger("evaluation.sr")

# PAPER.md, x4 PSNR / SSIM (approx.): bicubic, l_pixel, SRCNN, l_feat.
PAPER_X4 = {
    "Set5": {"bicubic": (28.43, 0.811), "l_pixel": (28.40, 0.810), "l_feat": (27.09, 0.768)},
    "Set14": {"bicubic": (25.99, 0.730), "l_pixel": (25.96, 0.730), "l_feat": (24.99, 0.673)},
    "BSD100": {"bicubic": (25.96, 0.682), "l_pixel": (25.75, 0.699), "l_feat": (24.95, 0.632)},
}


def sr_factor(entry: ModelEntry) -> int:
    return int(entry.factor or entry.arch.factor)  # type: ignore[union-attr]


@dataclass
class SRRow:
    set: str
    image: str
    factor: int
    method: str
    psnr: float
    ssim: float
    lpips: float
    grid: float
    """The LR-grid pattern in 8-bit levels (``evaluation.metrics.grid_levels``)."""
    lpips_without_grid: float | None = None
    """LPIPS of the output less its LR-grid pattern (``--lpips-without-grid``): how much of
    the LPIPS the pattern earns."""


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
    lpips_without_grid: bool = False,
) -> list[SRRow]:
    """Score bicubic and every model on every image; one row per (image, factor, method)."""
    device = device or torch.device("cpu")
    if lpips_precision == "auto":
        lpips_precision = auto_precision(device, "bf16")
    nets: dict[int, list[tuple[str, nn.Module]]] = {}
    for name in models:
        net, entry = load_model_of_kind(name, "sr", root, device)
        nets.setdefault(sr_factor(entry), []).append((name, net))
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
                with torch.inference_mode(), autocast(device, lpips_precision):
                    ref = metric.features_of(_shaved_tensor(hr, factor, device))
                    for method, output in outputs.items():
                        scores = sr_scores(output, hr, factor)
                        feats = metric.features_of(_shaved_tensor(output, factor, device))
                        distance = float(metric.distance(feats, ref)[0])
                        row = SRRow(set_name, path.name, factor, method, **scores, lpips=distance)
                        if lpips_without_grid:
                            clean = _shaved_without_grid(output, hr, factor, device)
                            feats = metric.features_of(clean)
                            row.lpips_without_grid = float(metric.distance(feats, ref)[0])
                        rows.append(row)
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


def _shaved_without_grid(
    output: Image.Image, hr: Image.Image, factor: int, device: torch.device
) -> torch.Tensor:
    """The shaved crop LPIPS sees, less its LR-grid pattern (the shave keeps the phases on the
    LR grid), rounded to 8 bits as an output would be."""
    w, h = output.size
    box = (factor, factor, w - factor, h - factor)
    clean = without_grid(np.asarray(output.crop(box)), np.asarray(hr.crop(box)), factor)
    return to_tensor(Image.fromarray(np.clip(clean, 0, 255).round().astype(np.uint8))).to(device)


def _shaved_tensor(img: Image.Image, border: int, device: torch.device) -> torch.Tensor:
    w, h = img.size
    return to_tensor(img.crop((border, border, w - border, h - border))).to(device)


def summarise_sr(rows: Sequence[SRRow]) -> dict[int, dict[str, dict[str, dict[str, float]]]]:
    """factor -> set -> method -> mean psnr / ssim / lpips / grid and image count."""
    groups: dict[tuple[int, str, str], list[SRRow]] = {}
    for row in rows:
        groups.setdefault((row.factor, row.set, row.method), []).append(row)
    out: dict[int, dict[str, dict[str, dict[str, float]]]] = {}
    for (factor, set_name, method), items in groups.items():
        out.setdefault(factor, {}).setdefault(set_name, {})[method] = {
            "psnr": statistics.fmean(r.psnr for r in items),
            "ssim": statistics.fmean(r.ssim for r in items),
            "lpips": statistics.fmean(r.lpips for r in items),
            "grid": statistics.fmean(r.grid for r in items),
            "images": len(items),
        }
        if all(r.lpips_without_grid is not None for r in items):
            out[factor][set_name][method]["lpips_without_grid"] = statistics.fmean(
                r.lpips_without_grid
                for r in items  # type: ignore[misc]
            )
    return out


def sr_markdown(summary: dict[int, dict[str, dict[str, dict[str, float]]]]) -> str:
    lines = [
        "PSNR (dB) / SSIM on Y (BT.601), border of f px cropped, HR modcropped; "
        "LPIPS-VGG (lower is better) on the same crop; grid: the residual's pattern repeating "
        "on the LR pixel grid, RMS in 8-bit levels (lower is better; "
        "`evaluation.metrics.grid_levels`).",
        "",
    ]
    for factor, sets in sorted(summary.items()):
        methods = list(next(iter(sets.values())).keys())
        header = ["set", *[f"{m} PSNR / SSIM / LPIPS / grid" for m in methods]]
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
                cells.append(
                    f"{fmt(s['psnr'], 2)} / {fmt(s['ssim'], 3)} / {fmt(s['lpips'], 3)} / "
                    f"{fmt(s['grid'], 2)}"
                )
            if paper:
                ref = PAPER_X4.get(set_name, {})
                for key in ("bicubic", "l_pixel", "l_feat"):
                    cells.append(f"{ref[key][0]:.2f} / {ref[key][1]:.3f}" if key in ref else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if all("lpips_without_grid" in m for by in sets.values() for m in by.values()):
            lines += [
                "LPIPS as measured -> with each output's LR-grid pattern removed "
                "(`--lpips-without-grid`; lower is better):",
                "",
                "| set | " + " | ".join(methods) + " |",
                "|" + "---|" * (len(methods) + 1),
            ]
            for set_name, by_method in sets.items():
                pairs = [
                    (by_method[m]["lpips"], by_method[m]["lpips_without_grid"]) for m in methods
                ]
                cells = [f"{fmt(a, 3)} -> {fmt(b, 3)}" for a, b in pairs]
                lines.append(f"| {set_name} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def store_sr_metrics(
    summary: dict[int, dict[str, dict[str, dict[str, float]]]],
    models: Sequence[str],
    root: str | None,
    protocol: dict[str, Any],
    key: str = "sr",
) -> list[str]:
    """Each model gets its own scores per set, with bicubic beside them for reference.

    Merged by set, as style results merge by size: a run over Set5 alone must not erase the
    BSD100 numbers. Each set keeps the protocol it was measured under (``protocol`` at the top
    is the latest run's). A partial run (``--limit``) never replaces a measurement of the same
    set on more images: the stored numbers stay the full-set ones. New weights start with no
    metrics (``registry``), so what is kept always describes the weights shipped. Returns
    ``model/set`` for each measurement kept that way.
    """
    kept: list[str] = []
    for name in models:
        entry = registry.get_entry(name, root)
        factor = sr_factor(entry)
        previous = entry.metrics.get(key, {})
        sets = {
            set_name: {"protocol": previous.get("protocol", {}), **result}
            for set_name, result in previous.get("sets", {}).items()
        }
        measured = {
            set_name: {**by_method[name], "bicubic": by_method["bicubic"], "protocol": protocol}
            for set_name, by_method in summary.get(factor, {}).items()
            if name in by_method
        }
        sets, kept_here = merge_measurements(sets, measured, lambda r: r.get("images", 0), name)
        kept += kept_here
        registry.update_metrics(name, {key: {"protocol": protocol, "sets": sets}}, root)
    return kept


def _comparable_lpips(entry: ModelEntry) -> dict[str, tuple[float, tuple[Any, ...]]]:
    """Each set's stored LPIPS with what decides whether two models' numbers compare: the
    LPIPS precision, the LR degradation and the number of images (a set measured by the
    latest run carries no protocol of its own: the top-level one is its)."""
    stored = entry.metrics.get("sr", {})
    latest = stored.get("protocol", {})
    out = {}
    for name, result in stored.get("sets", {}).items():
        if result.get("lpips") is None:
            continue
        protocol = result.get("protocol") or latest
        key = (protocol.get("lpips"), protocol.get("lr"), result.get("images"))
        out[name] = (float(result["lpips"]), key)
    return out


def choose_default_upscalers(manifest: Manifest) -> tuple[dict[int, str], list[str]]:
    """The model each factor should serve by default, and one line per factor saying why.

    The lowest mean LPIPS over the benchmark sets that every model of that factor was measured
    on under the same protocol: LPIPS because the service is for people looking at pictures,
    and the paper's point is that PSNR misjudges them. A factor with one model serves it; a
    factor where some model has no comparable measurement keeps its current default (new
    weights start unmeasured, and an unmeasured net must not win or lose by default)."""
    defaults = dict(manifest.default_upscalers)
    reasons = []
    by_factor: dict[int, list[ModelEntry]] = {}
    for entry in manifest.models:
        if entry.kind == "sr":
            by_factor.setdefault(sr_factor(entry), []).append(entry)
    for factor, entries in sorted(by_factor.items()):
        current = manifest.default_upscaler(factor)
        if len(entries) == 1:
            defaults[factor] = entries[0].name
            reasons.append(f"x{factor}: {entries[0].name} (the only x{factor} model)")
            continue
        scores = {e.name: _comparable_lpips(e) for e in entries}
        common = set.intersection(*(set(s) for s in scores.values()))
        common = {name for name in common if len({scores[m][name][1] for m in scores}) == 1}
        if not common:
            unmeasured = sorted(m for m, s in scores.items() if not s) or sorted(scores)
            reasons.append(
                f"x{factor}: kept {current} (no set measured alike for {', '.join(unmeasured)})"
            )
            continue
        means = {m: statistics.fmean(s[name][0] for name in common) for m, s in scores.items()}
        best = min(sorted(means), key=means.__getitem__)
        defaults[factor] = best
        ranking = ", ".join(f"{m} {means[m]:.4f}" for m in sorted(means, key=means.__getitem__))
        reasons.append(
            f"x{factor}: {best} (mean LPIPS over {', '.join(sorted(common))}: {ranking})"
        )
    return defaults, reasons


def store_default_upscalers(root: str | None) -> list[str]:
    """Re-choose each factor's default from the stored measurements and write it into the
    manifest; returns the reasons, for the operator."""
    manifest = read_manifest(root)
    defaults, reasons = choose_default_upscalers(manifest)
    if defaults != manifest.default_upscalers:
        manifest.default_upscalers = defaults
        write_manifest(manifest, root)
    return reasons

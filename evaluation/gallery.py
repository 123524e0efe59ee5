"""``python -m evaluation gallery``: the two pictures in ``docs/`` that show what the zoo does.

* ``docs/gallery_styles.jpg``: every style model of the zoo on three photos (rows), the photo
  itself in the first column.
* ``docs/gallery_sr.jpg``: for each SR factor, crops of bicubic / pixel-loss model /
  feature-loss model / HR, enlarged with nearest-neighbour so the pixels stay visible. The LR
  input is made with the training degradation (``training.data.degrade``), as in evaluation.

The default photos are ``evaluation/photos`` (public domain / CC0, in no training set): a file
committed to the repository may not show the benchmark sets, and the Kodak images it showed
until 2026-12-03 are training photos, which flattered every model. A gallery illustrates; the
held-out numbers are in the evaluation tables (``python -m evaluation``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from evaluation.common import StyleUnderTest, load_styles
from evaluation.metrics import bicubic_upscale, modcrop, rgb_to_y
from evaluation.sr import make_lr
from evaluation.style import square_photo
from model_zoo import registry
from model_zoo.imaging import load_rgb, to_image, to_tensor
from model_zoo.manifest import ModelEntry
from model_zoo.reference import run_model

log = logging.getLogger("evaluation.gallery")

HELD_OUT = Path(__file__).resolve().parent / "photos"
"""Photos no net trained on, free to show (``photos/README.md``): a gallery of training photos
would flatter every model (the Kodak images it used until 2026-12-03 are in the training set)."""
DEFAULT_STYLE_PHOTOS = [
    HELD_OUT / "astronaut.jpg",
    HELD_OUT / "chelsea.jpg",
    HELD_OUT / "coffee.jpg",
]
DEFAULT_SR_PHOTOS = [HELD_OUT / "coffee.jpg", HELD_OUT / "astronaut.jpg"]
LABEL_HEIGHT = 18
BACKGROUND = (255, 255, 255)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=13)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(
    rows: Sequence[Sequence[tuple[str, Image.Image | None]]], cell: int
) -> Image.Image:
    """Rows of (caption, tile) cells, each tile resized to ``cell`` px; None leaves a blank.
    A caption wider than its cell wraps at spaces onto more lines (its row's label band grows)
    rather than running into the next cell's."""
    columns = max(len(row) for row in rows)
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [[_wrap(caption, cell - 8, font, measure) for caption, _ in row] for row in rows]
    bands = [LABEL_HEIGHT * max(len(lines) for lines in row) for row in wrapped]
    grid = Image.new("RGB", (columns * cell, sum(bands) + len(rows) * cell), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    y = 0
    for row, lines_of_row, band in zip(rows, wrapped, bands, strict=True):
        for c, ((_, tile), lines) in enumerate(zip(row, lines_of_row, strict=True)):
            x = c * cell
            for k, line in enumerate(lines):
                draw.text((x + 4, y + 2 + k * LABEL_HEIGHT), line, fill=(0, 0, 0), font=font)
            if tile is not None:
                grid.paste(tile, (x, y + band))
        y += band + cell
    return grid


def _wrap(
    caption: str,
    width: int,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    draw: ImageDraw.ImageDraw,
) -> list[str]:
    """``caption`` in lines of at most ``width`` px, broken at spaces (a single word that is
    wider stays whole)."""
    lines: list[str] = []
    for word in caption.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines or [""]


def save_jpeg(img: Image.Image, path: Path, quality: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=quality, optimize=True, progressive=True)
    size = path.stat().st_size
    log.info("wrote %s (%dx%d, %.0f KB)", path, img.width, img.height, size / 1024)
    return size


def style_gallery(
    styles: Sequence[StyleUnderTest],
    photos: Sequence[Path],
    *,
    size: int,
    cell: int,
    precision: str = "fp32",
) -> Image.Image:
    """Stylise each photo at ``size`` px (square), shown at ``cell`` px: every style of the zoo
    (single-style nets and each slot of a multi-style net) in its own column."""
    squares = [square_photo(load_rgb(p), size) for p in photos]
    columns: list[tuple[str, list[Image.Image]]] = [("photo", squares)]
    for under_test in styles:
        tiles = [
            to_image(run_model(under_test.net, to_tensor(s), precision, under_test.style))
            for s in squares
        ]
        columns.append((under_test.name, tiles))
    rows = [
        [(name, tiles[i].resize((cell, cell), Image.Resampling.LANCZOS)) for name, tiles in columns]
        for i in range(len(squares))
    ]
    return labelled_grid(rows, cell)


def controls_gallery(
    photo: Path, style: str, mix_with: str | None, *, root: str | None, size: int, cell: int
) -> Image.Image:
    """What the service's style controls do, through the worker's own engine (fp32): a strength
    ramp, keep-colours, ``max_side`` (strokes look larger on a smaller photo) and, when the
    style lives in a multi-style net with ``mix_with``, a two-style mix ramp."""
    from jobqueue.protocol import StyleControls
    from model_zoo.manifest import read_manifest
    from model_zoo.styles import resolve_style
    from worker.engine import Engine

    engine = Engine(zoo_dir=root, precision="fp32")
    manifest = read_manifest(root)
    pixels = np.asarray(square_photo(load_rgb(photo), size))

    def run(choice_style: str | None, mix: str | None, **controls: Any) -> Image.Image:
        choice = resolve_style(manifest, choice_style, mix)
        request = StyleControls(slots=choice.slots, identity=choice.identity, **controls)
        (out,) = engine.run([(choice.model, pixels, request)])
        return Image.fromarray(out.pixels[..., :3])

    def tile(img: Image.Image) -> Image.Image:
        return img.resize((cell, cell), Image.Resampling.LANCZOS)

    rows: list[list[tuple[str, Image.Image | None]]] = [
        [("photo", tile(Image.fromarray(pixels)))]
        + [(f"strength {s:g}", tile(run(style, None, strength=s))) for s in (0.25, 0.5, 0.75, 1)]
    ]
    small = Image.fromarray(pixels).resize((size // 2, size // 2), Image.Resampling.LANCZOS)
    choice = resolve_style(manifest, style, None)
    request = StyleControls(slots=choice.slots, identity=choice.identity)
    (half,) = engine.run([(choice.model, np.asarray(small), request)])
    rows.append(
        [
            (style, tile(run(style, None))),
            ("keep colours", tile(run(style, None, keep_colors=True))),
            (f"max_side {size // 2}", tile(Image.fromarray(half.pixels[..., :3]))),
        ]
    )
    if mix_with is not None and choice.slots and style != mix_with:
        rows.append(
            [
                (
                    f"{style} {1 - w:g} / {mix_with} {w:g}",
                    tile(run(None, f"{style}:{1 - w},{mix_with}:{w}")),
                )
                for w in (0.0, 0.25, 0.5, 0.75, 1.0)
            ]
        )
    return labelled_grid(rows, cell)


def textured_crop_box(img: Image.Image, crop: int, stride: int = 8) -> tuple[int, int, int, int]:
    """The ``crop`` x ``crop`` window with the most luma gradient energy: where SR differs."""
    y = rgb_to_y(img)
    energy = np.abs(np.diff(y, axis=0))[:, :-1] + np.abs(np.diff(y, axis=1))[:-1, :]
    h, w = energy.shape
    if h < crop or w < crop:
        return (0, 0, min(crop, img.width), min(crop, img.height))
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, best_xy = -1.0, (0, 0)
    for top in range(0, h - crop + 1, stride):
        for left in range(0, w - crop + 1, stride):
            total = (
                integral[top + crop, left + crop]
                - integral[top, left + crop]
                - integral[top + crop, left]
                + integral[top, left]
            )
            if total > best:
                best, best_xy = float(total), (left, top)
    left, top = best_xy
    return (left, top, left + crop, top + crop)


def _sr_methods(entries: Sequence[ModelEntry]) -> dict[int, list[ModelEntry]]:
    """Per factor: pixel-loss models first, then the feature-loss ones (the paper's order)."""
    by_factor: dict[int, list[ModelEntry]] = {}
    for entry in entries:
        factor = int(entry.factor or entry.arch.factor)  # type: ignore[union-attr]
        by_factor.setdefault(factor, []).append(entry)
    for models in by_factor.values():
        models.sort(key=lambda e: (e.loss != "pixel", e.name))
    return dict(sorted(by_factor.items()))


def sr_gallery(
    entries: Sequence[ModelEntry],
    photos: Sequence[Path],
    *,
    root: str | None,
    crop: int,
    cell: int,
    precision: str = "fp32",
) -> Image.Image:
    """One row per (factor, photo): bicubic | models | HR on the most textured crop."""
    rows: list[list[tuple[str, Image.Image | None]]] = []
    nets = {e.name: registry.load_model(e.name, root=root)[0] for e in entries}
    for factor, models in _sr_methods(entries).items():
        for path in photos:
            hr = modcrop(load_rgb(path), factor)
            lr = make_lr(hr, factor)  # the training degradation, as in evaluation
            box = textured_crop_box(hr, crop)
            outputs = [(f"bicubic x{factor}", bicubic_upscale(lr, factor))]
            for e in models:
                out = to_image(run_model(nets[e.name], to_tensor(lr), precision))
                outputs.append((f"{e.name} ({e.loss or 'sr'} loss)", out))
            outputs.append(("HR", hr))
            rows.append(
                [
                    (
                        label,
                        img.crop(box).resize((cell, cell), Image.Resampling.NEAREST),
                    )
                    for label, img in outputs
                ]
            )
    return labelled_grid(rows, cell)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo", default=None, help="zoo folder (default: $MODEL_ZOO_DIR or ours)")
    parser.add_argument("--photos", nargs="+", type=Path, default=DEFAULT_STYLE_PHOTOS)
    parser.add_argument("--sr-photos", nargs="+", type=Path, default=DEFAULT_SR_PHOTOS)
    parser.add_argument("--styles-out", type=Path, default=Path("docs/gallery_styles.jpg"))
    parser.add_argument("--sr-out", type=Path, default=Path("docs/gallery_sr.jpg"))
    parser.add_argument("--controls-out", type=Path, default=Path("docs/gallery_controls.jpg"))
    parser.add_argument("--controls-style", default=None, help="style of the controls sheet")
    parser.add_argument("--mix-with", default=None, help="second style of the mix ramp")
    parser.add_argument("--style-size", type=int, default=512, help="stylisation input size (px)")
    parser.add_argument("--cell", type=int, default=160, help="style tile size in the grid (px)")
    parser.add_argument("--sr-crop", type=int, default=80, help="HR crop side (px)")
    parser.add_argument("--sr-cell", type=int, default=160, help="SR tile size in the grid (px)")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])


def run(args: argparse.Namespace) -> int:
    missing = [str(p) for p in [*args.photos, *args.sr_photos] if not p.exists()]
    if missing:
        print(f"error: photos not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    entries = registry.list_models(args.zoo)
    styles = load_styles(None, args.zoo, torch.device("cpu"))
    srs = [e for e in entries if e.kind == "sr"]
    if not styles and not srs:
        print("error: the zoo has no models", file=sys.stderr)
        return 2
    total = 0
    if styles:
        grid = style_gallery(
            styles, args.photos, size=args.style_size, cell=args.cell, precision=args.precision
        )
        total += save_jpeg(grid, args.styles_out, args.quality)
        mixable = [s.name for s in styles if s.style is not None]
        first = args.controls_style or (mixable or [styles[0].name])[0]
        second = args.mix_with or next((n for n in mixable if n != first), None)
        grid = controls_gallery(
            args.photos[0], first, second, root=args.zoo, size=args.style_size, cell=args.cell
        )
        total += save_jpeg(grid, args.controls_out, args.quality)
    if srs:
        grid = sr_gallery(
            srs,
            args.sr_photos,
            root=args.zoo,
            crop=args.sr_crop,
            cell=args.sr_cell,
            precision=args.precision,
        )
        total += save_jpeg(grid, args.sr_out, args.quality)
    print(f"gallery: {total / 1024:.0f} KB in total")
    return 0

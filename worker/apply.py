"""``python -m worker.apply``: the service's transforms on files, without Redis or HTTP.

It runs the worker's own engine (``worker.engine.Engine``), so a file gets exactly what the
service would return: the same precision decision, large images in seamless tiles with bounded
memory (a 4000 x 3000 photo no longer needs 12 GB), alpha kept, and the style controls.

    python -m worker.apply --list
    python -m worker.apply --style mosaic photo.jpg -o out.png
    python -m worker.apply --mix mosaic:0.7,candy:0.3 --strength 0.8 --keep-colors photos/
    python -m worker.apply --upscale 4 small.png --out-dir big/

Inputs may be files or folders (every image below them); outputs go to ``-o`` (one input),
``--out-dir``, or next to each input as ``<stem>.<style or xF>.<format>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from jobqueue.protocol import StyleControls
from model_zoo.manifest import read_manifest
from model_zoo.registry import ModelNotFoundError, WeightsIntegrityError
from model_zoo.styles import StyleMixError, UnknownStyleError, resolve_style
from worker.encoding import EncodeOptions, encode
from worker.engine import Engine

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".gif"}
FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}


class ApplyError(ValueError):
    """A bad request on the command line: exit 2 with the message, no traceback."""


def list_zoo(zoo: str | None) -> str:
    """Every style (with the net and slot behind it) and every upscaler."""
    manifest = read_manifest(zoo)
    lines = ["styles:"]
    for name, ref in sorted(manifest.styles().items()):
        where = ref.model if ref.index is None else f"{ref.model} slot {ref.index}"
        lines.append(f"  {name:20s} {where}")
    lines.append("upscalers:")
    for entry in manifest.models:
        if entry.kind == "sr":
            mark = f", default for x{entry.factor}" if manifest.is_default_upscaler(entry) else ""
            lines.append(f"  {entry.name:20s} x{entry.factor} ({entry.loss} loss{mark})")
    return "\n".join(lines)


def inputs_of(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists():
            files.append(item)
        else:
            raise ApplyError(f"no such file or folder: {item}")
    if not files:
        raise ApplyError("no input images")
    return files


def load_pixels(path: Path) -> np.ndarray:
    """H x W x 3 (or 4 with alpha) uint8, EXIF orientation applied, as the API decodes."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            return np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise ApplyError(f"cannot read {path}: {exc}") from exc


def _shrink(pixels: np.ndarray, max_side: int | None) -> np.ndarray:
    height, width = pixels.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return pixels
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    mode = "RGBA" if pixels.shape[2] == 4 else "RGB"
    return np.asarray(Image.fromarray(pixels, mode).resize(size, Image.Resampling.LANCZOS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker.apply",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the zoo's styles and upscalers")
    what.add_argument("--style", help="a style name (see --list)")
    what.add_argument("--mix", help="a mix of styles of one net, e.g. mosaic:0.7,candy:0.3")
    what.add_argument("--upscale", type=int, choices=[4, 8], help="super-resolution factor")
    what.add_argument("--model", help="any zoo model by name (a single-style net or an upscaler)")
    parser.add_argument(
        "--sr-model", help="with --upscale: this SR model instead of the zoo's default for F"
    )
    parser.add_argument("--strength", type=float, default=1.0, help="style strength, 0..1")
    parser.add_argument("--keep-colors", action="store_true", help="keep the photo's colours")
    parser.add_argument("--max-side", type=int, default=None, help="shrink inputs to this side")
    parser.add_argument("inputs", nargs="*", help="image files or folders")
    parser.add_argument("-o", "--output", help="output file (one input only)")
    parser.add_argument("--out-dir", help="folder for the outputs (default: next to inputs)")
    parser.add_argument("--format", default="png", choices=sorted(FORMATS))
    parser.add_argument("--zoo", default=None, help="zoo folder (default: $MODEL_ZOO_DIR or ours)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--tile-size", type=int, default=1024, help="largest tile side (px)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _plan(args: argparse.Namespace) -> tuple[str, StyleControls, str]:
    """(zoo model, controls, output suffix) for the request on the command line."""
    if not 0.0 <= args.strength <= 1.0:
        raise ApplyError(f"--strength must be between 0 and 1, not {args.strength}")
    if args.max_side is not None and args.max_side < 16:
        raise ApplyError("--max-side must be at least 16")
    manifest = read_manifest(args.zoo)
    if args.upscale:
        name = args.sr_model or manifest.default_upscaler(args.upscale)
        entry = next((m for m in manifest.models if m.name == name and m.kind == "sr"), None)
        if entry is None or entry.factor != args.upscale:
            raise ApplyError(f"no x{args.upscale} upscaler named {name!r} (see --list)")
        return name, StyleControls(), f"x{args.upscale}"
    if args.model:
        if args.model not in manifest.names():
            raise ApplyError(str(ModelNotFoundError(args.model, manifest.names())))
        return (
            args.model,
            StyleControls(strength=args.strength, keep_colors=args.keep_colors),
            (args.model),
        )
    if not (args.style or args.mix):
        raise ApplyError("give --style, --mix, --upscale or --model (or --list)")
    try:
        choice = resolve_style(manifest, args.style, args.mix)
    except (UnknownStyleError, StyleMixError) as exc:
        raise ApplyError(str(exc)) from exc
    controls = StyleControls(
        slots=choice.slots,
        identity=choice.identity,
        strength=args.strength,
        keep_colors=args.keep_colors,
    )
    suffix = args.style or "mix-" + "-".join(choice.styles)
    return choice.model, controls, suffix


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(list_zoo(args.zoo))
        return 0
    model, controls, suffix = _plan(args)
    files = inputs_of(args.inputs)
    if args.output and len(files) != 1:
        raise ApplyError("-o/--output takes one input; use --out-dir for several")
    engine = Engine(
        zoo_dir=args.zoo,
        device=args.device,
        precision=args.precision,
        tile_size=args.tile_size,
        whole_max_pixels="auto",  # as the worker runs big images
    )
    engine.model(model)  # load (and calibrate) once, before the first file
    fmt = FORMATS[args.format]
    options = EncodeOptions()
    shrink = args.max_side if engine.model(model).kind == "style" else None
    for path in tqdm(files, unit="img", disable=args.quiet or len(files) == 1):
        pixels = _shrink(load_pixels(path), shrink)
        (result,) = engine.run([(model, pixels, controls)])
        if args.output:
            target = Path(args.output)
        else:
            folder = Path(args.out_dir) if args.out_dir else path.parent
            target = folder / f"{path.stem}.{suffix}.{args.format}"
        target.parent.mkdir(parents=True, exist_ok=True)
        data, _ = encode(result.pixels, fmt, options)
        target.write_bytes(data)
        height, width = result.pixels.shape[:2]
        if len(files) == 1 or args.quiet:
            print(f"{path} -> {target} ({width}x{height})")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ApplyError, ModelNotFoundError, WeightsIntegrityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

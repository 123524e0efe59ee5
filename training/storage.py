"""fp16 storage of zoo weights: half the bytes, outputs checked against the fp32 weights.

An offline zoo tool (serving needs only the upcast in ``model_zoo.registry``), so it lives
with the trainer, which writes the zoo.

Why: the GPU campaign's working tree travels with a 64 MiB limit (README, "Training on a
GPU"), and seven single-style nets of 6.7 MB fp32 each are most of the tracked tree. Storing
their weights in fp16 halves that; :func:`model_zoo.registry.load_model` upcasts every floating
tensor to fp32 at load, so every caller (the worker, evaluation, the reference path) still
computes in the precision it asks for. Only the *rounding of the weights* changes, and that is
measured here before anything is written: the stored model's outputs on real photos must stay
within ``min_psnr_db`` (default 40, the worker's ``MIN_PSNR_DB`` gate) of the fp32 weights'
outputs, on 8-bit outputs as the worker measures them, for every style slot. A model that
fails keeps its fp32 file. The measurement and the fp32 file's sha256 are recorded in the
entry's ``metrics["storage"]``, so what was compared with what stays on record.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model_zoo.imaging import to_tensor
from model_zoo.manifest import ModelEntry, read_manifest, write_manifest, zoo_dir
from model_zoo.nets import MultiStyleNet, build_net
from model_zoo.registry import file_metadata, load_model, sha256_file

REPO = Path(__file__).resolve().parent.parent
# The worker's own calibration photos and the web page's sample photo: freely redistributable
# Kodak images, and real photos (synthetic probes overstate the PSNR).
DEFAULT_PHOTOS = (
    *sorted((REPO / "worker" / "calibration").glob("*.png")),
    REPO / "service" / "static" / "sample.jpg",
)
PROBE_SIDE = 256
FP16_MAX = 65504.0


class StorageRefused(ValueError):
    """fp16 rounding of this model's weights costs more than the allowed PSNR."""


def half_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The net's tensors with every floating one in fp16 (integer counters kept as they are).

    A weight beyond fp16's range would become inf: refused rather than stored.
    """
    state: dict[str, torch.Tensor] = {}
    for key, value in net.state_dict().items():
        value = value.detach().cpu().contiguous()
        if value.is_floating_point():
            if value.abs().max().item() > FP16_MAX:
                raise StorageRefused(f"{key} exceeds fp16's range")
            value = value.half()
        state[key] = value
    return state


def probes(photos: Sequence[Path], factor: int) -> list[torch.Tensor]:
    """Each photo's centre square at ``PROBE_SIDE`` px (or smaller if the photo is), shrunk by
    ``factor`` for an SR net (its input is a low-resolution image)."""
    out = []
    for path in photos:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        side = min(PROBE_SIDE, *rgb.size)
        left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
        tile = rgb.crop((left, top, left + side, top + side))
        if factor > 1:
            tile = tile.resize((side // factor, side // factor), Image.Resampling.BICUBIC)
        out.append(to_tensor(tile))
    return out


def _style_rows(net: nn.Module) -> list[torch.Tensor | None]:
    if isinstance(net, MultiStyleNet):
        return [net.one_hot(i) for i in range(net.config.num_styles)]
    return [None]


@torch.inference_mode()
def output_psnr_db(
    reference: nn.Module, candidate: nn.Module, images: Sequence[torch.Tensor]
) -> tuple[float, float]:
    """The worst PSNR (dB) between the two nets' outputs over images and style slots: on 8-bit
    outputs, as ``worker.engine`` measures its precision gate (rounded 0-255 differences), and
    on the float outputs (which tells more when the 8-bit outputs are identical)."""
    worst8 = worst_float = 0.0
    for image in images:
        for row in _style_rows(reference):
            if row is None:
                a, b = reference(image), candidate(image)
            else:
                a, b = reference(image, row), candidate(image, row)
            diff = a.float().clamp(0, 1) - b.float().clamp(0, 1)
            worst8 = max(worst8, float((diff * 255).round().pow(2).mean()))
            worst_float = max(worst_float, float(diff.pow(2).mean()))
    psnr8 = math.inf if worst8 == 0 else 10 * math.log10(255**2 / worst8)
    return psnr8, (math.inf if worst_float == 0 else -10 * math.log10(worst_float))


def _db(value: float) -> float | str:
    return round(value, 2) if math.isfinite(value) else "inf"


def _stored_half(path: Path) -> bool:
    """The file really holds fp16 floats (a record alone may have outlived its weights)."""
    with safe_open(str(path), "pt") as weights:
        dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}  # noqa: SIM118
    return "F32" not in dtypes and "F16" in dtypes


def store_half(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    photos: Sequence[Path] = DEFAULT_PHOTOS,
    min_psnr_db: float = 40.0,
) -> dict[str, Any]:
    """Rewrite ``name``'s weights in fp16 if its outputs stay within ``min_psnr_db`` of fp32.

    Returns the record stored in ``metrics["storage"]``; raises :class:`StorageRefused` (and
    leaves the zoo as it was) when the rounding costs more.
    """
    folder = zoo_dir(root)
    net, entry = load_model(name, root=folder)
    path = folder / entry.weights
    if entry.metrics.get("storage", {}).get("dtype") == "fp16" and _stored_half(path):
        return dict(entry.metrics["storage"])
    half = half_state_dict(net)
    candidate = build_net(entry.arch)
    candidate.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in half.items()}
    )
    candidate.eval()
    images = probes(photos, entry.factor or 1)
    psnr, float_psnr = output_psnr_db(net, candidate, images)
    if psnr < min_psnr_db:
        raise StorageRefused(
            f"{name}: fp16 weights give outputs {psnr:.1f} dB from fp32 "
            f"(< {min_psnr_db}); kept fp32"
        )
    record = {
        "dtype": "fp16",
        "fp32_sha256": entry.sha256,
        "psnr_db_vs_fp32": _db(psnr),
        "float_psnr_db_vs_fp32": _db(float_psnr),
        "min_psnr_db": min_psnr_db,
        "probes": [p.name for p in photos],
        "probe_side": PROBE_SIDE,
    }
    tmp = path.with_suffix(".tmp")
    save_file(half, str(tmp), metadata=file_metadata(name=name, kind=entry.kind, dtype="fp16"))
    os.chmod(tmp, 0o644)
    manifest = read_manifest(folder)
    stored: ModelEntry = manifest.get(name)
    stored.sha256 = sha256_file(tmp)
    stored.metrics = {**stored.metrics, "storage": record}
    os.replace(tmp, path)
    write_manifest(manifest, folder)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.storage", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--zoo", default=None, help="zoo folder (default: $MODEL_ZOO_DIR or ours)")
    parser.add_argument("--min-psnr-db", type=float, default=40.0)
    parser.add_argument("--photos", nargs="+", type=Path, default=list(DEFAULT_PHOTOS))
    args = parser.parse_args(argv)
    status = 0
    for name in args.models:
        try:
            record = store_half(name, args.zoo, photos=args.photos, min_psnr_db=args.min_psnr_db)
        except StorageRefused as exc:
            print(f"{name}: refused: {exc}", file=sys.stderr)
            status = 1
            continue
        print(
            f"{name}: fp16, {record['psnr_db_vs_fp32']} dB vs fp32 on 8-bit outputs "
            f"({record['float_psnr_db_vs_fp32']} dB on float outputs)"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())

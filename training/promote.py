"""``python -m training.promote``: move a trained model from a run's zoo into the shipped zoo.

Training writes into a zoo of its own (``--zoo runs/zoo-ms``) so that a long run can never
break the shipped manifest, e.g. with a style name the shipped zoo already offers. Promotion is
the deliberate step: it copies the weights and the whole manifest entry (training record,
lineage, metrics), may make some of a multi-style net's slots private (``--private``: an older
single-style net of that name stays the served one) and retire single-style nets that the new
slots replace (``--retire``), all in one validated manifest write. The identity slot's
fidelity (PSNR of its output against the photo) is measured on the way and recorded in its
metrics: ``strength`` uses the slot only if it gives the photo back
(``model_zoo.manifest.ModelEntry.strength_identity_index``). A net that would replace the
shipped net of its name must pass the gate first (``evaluation.gate``: not worse on held-out
photos; ``--force`` promotes it anyway, and the entry's ``training.gate`` records either way).
The promoted weights are then
stored in fp16 as the rest of the zoo is (``training.storage``: only if the outputs stay
within 40 dB of fp32; otherwise they stay fp32 and the command says so); ``--keep-fp32``
skips it.

    python -m training.promote --from runs/zoo-ms --model multistyle \\
        --retire mosaic candy --private udnie --description "..."
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from evaluation.gate import GateSettings, check_replacement
from model_zoo.manifest import (
    IDENTITY_MIN_PSNR_DB,
    Manifest,
    ModelEntry,
    read_manifest,
    write_manifest,
    zoo_dir,
)
from model_zoo.registry import ModelNotFoundError, load_model, sha256_file
from training.storage import DEFAULT_PHOTOS, PROBE_SIDE, StorageRefused, probes, store_half


class ReplacementRefused(ValueError):
    """The gate found the net worse than the one it would replace."""


def identity_fidelity(source: Path, name: str) -> dict[str, Any] | None:
    """PSNR of the identity slot's fp32 output against the photo on the storage probes (8-bit,
    MSE over all photos); None for a net without an identity slot."""
    net, entry = load_model(name, root=source)
    if entry.identity_index is None:
        return None
    net.eval()
    error, count = 0.0, 0
    with torch.inference_mode():
        for photo in probes(DEFAULT_PHOTOS, 1):
            out = net(photo, net.one_hot(entry.identity_index)).clamp(0, 1)
            diff = ((out - photo) * 255).round()
            error, count = error + float(diff.pow(2).sum()), count + diff.numel()
    mse = error / count
    psnr = float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)
    return {
        "psnr_db": round(psnr, 2),
        "min_psnr_db": IDENTITY_MIN_PSNR_DB,
        "strength": "identity slot" if psnr >= IDENTITY_MIN_PSNR_DB else "pixel blend",
        "probes": [p.name for p in DEFAULT_PHOTOS],
        "probe_side": PROBE_SIDE,
    }


def record_identity_fidelity(entry: ModelEntry, source: Path) -> dict[str, Any] | None:
    """Measure the identity slot of ``entry`` (its weights in zoo ``source``) into the slot's
    metrics. Every path that ships new weights must do this: an identity slot without a
    measurement is trusted (``model_zoo.manifest``), so a poor one would turn ``strength`` into
    a blend through a slot that does not give the photo back."""
    fidelity = identity_fidelity(source, entry.name)
    for slot in entry.styles:
        if slot.role == "identity" and fidelity is not None:
            slot.metrics["fidelity"] = fidelity
    return fidelity


def promote(
    source: Path,
    name: str,
    target: Path,
    *,
    private: list[str] | None = None,
    retire: list[str] | None = None,
    description: str | None = None,
    gate: GateSettings | None = None,
    force: bool = False,
) -> ModelEntry:
    """Copy ``name`` from the zoo ``source`` into ``target`` (see the module docstring).

    ``description`` (what the model is, for the zoo's readers) replaces the run's; a model
    without one is refused: the trainer cannot know it, and a shipped entry must say it."""
    src = read_manifest(source)
    try:
        entry = src.get(name).model_copy(deep=True)
    except KeyError:
        raise ModelNotFoundError(name, src.names()) from None
    if description is not None:
        entry.description = description.strip()
    if not entry.description:
        raise ValueError(f"{name} has no description: pass --description")
    weights = source / entry.weights
    if sha256_file(weights) != entry.sha256:
        raise ValueError(f"{weights} does not match its manifest's sha256")
    private = private or []
    unknown = sorted(set(private) - {s.name for s in entry.styles})
    if unknown:
        raise ValueError(f"{name} has no slots named {', '.join(unknown)}")
    for slot in entry.styles:
        if slot.name in private:
            slot.public = False
    verdict = check_replacement(name, source, target, gate)
    if not verdict.accepted and not force:
        raise ReplacementRefused(
            f"{name} would replace a better net: {verdict.reason()} (--force to promote it anyway)"
        )
    entry.training = {**entry.training, "gate": verdict.record() | {"forced": not verdict.accepted}}
    record_identity_fidelity(entry, source)
    manifest = read_manifest(target)
    for old in retire or []:
        if old not in manifest.names():
            raise ModelNotFoundError(old, manifest.names())
    retired = [manifest.get(old) for old in retire or []]
    models = [m for m in manifest.models if m.name not in (retire or []) and m.name != name]
    updated = Manifest.model_validate(
        manifest.model_copy(update={"models": [*models, entry]}).model_dump()
    )
    updated.models.sort(key=lambda m: (m.kind, m.name))
    (target / entry.weights).parent.mkdir(parents=True, exist_ok=True)
    tmp = target / f"{entry.weights}.tmp"
    shutil.copyfile(weights, tmp)
    tmp.chmod(0o644)
    tmp.replace(target / entry.weights)
    write_manifest(updated, target)
    for old in retired:
        if not any(m.weights == old.weights for m in updated.models):
            (target / old.weights).unlink(missing_ok=True)
    return updated.get(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.promote", description=__doc__)
    parser.add_argument("--from", dest="source", type=Path, required=True, help="run's zoo")
    parser.add_argument("--model", required=True, help="the model to promote")
    parser.add_argument("--to", dest="target", type=Path, default=None, help="default: ours")
    parser.add_argument("--private", nargs="*", default=[], help="slots not to offer")
    parser.add_argument("--retire", nargs="*", default=[], help="models to remove")
    parser.add_argument(
        "--description", default=None, help="what the model is (required if the run has none)"
    )
    parser.add_argument("--keep-fp32", action="store_true", help="do not store the weights in fp16")
    parser.add_argument(
        "--force", action="store_true", help="promote even a net the gate finds worse"
    )
    parser.add_argument(
        "--gate-photos", type=Path, default=GateSettings().photos, help="the gate's photos"
    )
    args = parser.parse_args(argv)
    try:
        entry = promote(
            args.source,
            args.model,
            zoo_dir(args.target),
            private=args.private,
            retire=args.retire,
            description=args.description,
            gate=GateSettings(photos=args.gate_photos),
            force=args.force,
        )
    except (ValueError, ModelNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    public = [s.name for s in entry.styles if s.public and s.role == "style"]
    print(f"promoted {entry.name} ({entry.sha256[:12]}); public styles: {', '.join(public)}")
    for comparison in entry.training["gate"]["comparisons"]:
        worse = " WORSE (forced)" if comparison["worse"] else ""
        print(
            f"  gate {comparison['subject']} {comparison['measure']}: {comparison['candidate']:.5g}"
            f" vs shipped {comparison['shipped']:.5g}{worse}"
        )
    if not args.keep_fp32:
        try:
            record = store_half(entry.name, zoo_dir(args.target))
            print(f"stored in fp16: {record['psnr_db_vs_fp32']} dB from fp32 on 8-bit outputs")
        except StorageRefused as exc:
            print(f"kept in fp32: {exc}")
    for slot in entry.styles:
        if "fidelity" in slot.metrics:
            fidelity = slot.metrics["fidelity"]
            print(f"identity slot: {fidelity['psnr_db']} dB; strength by {fidelity['strength']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

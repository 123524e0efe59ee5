"""What comes back from the GPU, merged here: into the zoo, or into a run folder to resume.

``import DIR``: each model's tar is unpacked under ``--runs`` (its sample grids and loss curve
stay there to look at), its weights are checked against the sha256 of its manifest entry,
copied into the zoo and its entry upserted, with the hardware, iterations, wall time, data
pack and lineage the campaign recorded, unless the gate (``evaluation.gate``) finds it worse
than the zoo's net of that name on held-out photos: then the zoo keeps its net, the new one
stays unpacked under ``--runs`` and the command says why (``--force`` merges it anyway; what
the gate measured is recorded in the entry's ``training.gate``). Then the weights are stored in
fp16 where that keeps
the outputs within 40 dB of fp32 (``training.storage``, how the whole zoo is stored). A
multi-style net's slots whose names another model of the zoo already offers are kept private
(``public: false``): which net serves a style name is a decision, not a side effect of an
import (``--public-slots`` overrides). A teacher (``summary.json``'s ``teachers``: the wide
multi-style net the shipped student was distilled from) is unpacked but not merged: it is
kept under ``--runs`` for later students (``training distill --teacher-zoo``), and a worker
would only load it for nothing. ``scripts/gpu_import.sh`` then runs the evaluation and the
gallery.

``restore DIR``: the checkpoints go back into a campaign folder (default ``.campaign``), so a
campaign on a fresh machine (carry ``.campaign``) resumes where the last one stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evaluation.gate import GateSettings, Verdict, check_replacement
from model_zoo.manifest import Manifest, ModelEntry, read_manifest, write_manifest
from model_zoo.registry import sha256_file
from training.gpu.campaign import SUMMARY
from training.promote import record_identity_fidelity
from training.storage import StorageRefused, store_half

log = logging.getLogger("training.gpu.results")


class ResultsError(RuntimeError):
    """A result is incomplete or does not match its manifest entry."""


@dataclass
class Result:
    """One model as it came back."""

    name: str
    folder: Path
    entry: ModelEntry | None

    @property
    def weights(self) -> Path | None:
        return self.folder / self.entry.weights if self.entry else None


def unpack(results: Path, into: Path) -> list[Result]:
    """Unpack every model's tar of ``results`` into ``into`` (data-only extraction: no links or
    absolute paths), one folder per model. Where the campaign's ``summary.json`` lists its
    files, only those: the lease's ``serving.tar`` (the serving figures and the campaign's
    log) is no model."""
    into.mkdir(parents=True, exist_ok=True)
    out = []
    tars = sorted(results.glob("*.tar"))
    if (results / SUMMARY).exists():
        listed = set(json.loads((results / SUMMARY).read_text()).get("files", []))
        tars = [t for t in tars if t.name in listed]
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            tar.extractall(into, filter="data")
        folder = into / tar_path.stem
        entry_path = folder / "entry.json"
        entry = None
        if entry_path.exists():
            entry = ModelEntry.model_validate_json(entry_path.read_text())
        out.append(Result(tar_path.stem, folder, entry))
    if (results / SUMMARY).exists():
        shutil.copyfile(results / SUMMARY, into / SUMMARY)
    return out


def _description(entry: ModelEntry) -> str:
    total = entry.training.get("total_iterations", entry.iterations)
    batch = entry.training.get("batch_size")
    when = entry.created[:10]
    if entry.styles:
        styles = [s.name for s in entry.styles if s.role == "style"]
        what = f"multi-style net ({len(styles)} styles: {', '.join(styles)}; identity slot)"
    elif entry.kind == "sr":
        what = f"SR x{entry.factor}, {entry.loss} loss"
    else:
        what = "style net"
    return f"{what}; {total:,} iterations at batch {batch} on {entry.hardware} ({when})"


def checked_entry(result: Result) -> ModelEntry:
    """The result's entry, once its weights are there and match its sha256."""
    entry, weights = result.entry, result.weights
    if entry is None or weights is None or not weights.exists():
        raise ResultsError(f"{result.name}: no exported model in its tar (see its stage.json)")
    if sha256_file(weights) != entry.sha256:
        raise ResultsError(f"{result.name}: weights do not match their entry's sha256")
    return entry


def gate(result: Result, zoo: Path, settings: GateSettings) -> Verdict:
    """The gate's verdict on the result replacing the zoo's net of its name. The unpacked folder
    becomes a one-model zoo (its own manifest beside the weights) so that both nets load the
    same way."""
    entry = checked_entry(result)
    write_manifest(Manifest(models=[entry]), result.folder)
    return check_replacement(entry.name, result.folder, zoo, settings)


def merge(result: Result, zoo: Path, *, public_slots: bool = False) -> tuple[ModelEntry, list[str]]:
    """Copy the weights into the zoo and upsert the entry (validated before anything is
    replaced). Returns the entry and the slot names made private. Call it after :func:`gate`,
    which leaves the result's folder a one-model zoo."""
    entry = checked_entry(result)
    weights = result.folder / entry.weights
    manifest = read_manifest(zoo)
    others = Manifest(models=[m for m in manifest.models if m.name != entry.name]).styles()
    private = []
    if not public_slots:
        for slot in entry.styles:
            if slot.public and slot.role == "style" and slot.name in others:
                slot.public = False
                private.append(slot.name)
    entry.metrics = {}  # new weights: the old measurements describe other weights
    for slot in entry.styles:
        slot.metrics = {}
    record_identity_fidelity(entry, result.folder)  # a one-model zoo since ``gate``
    entry.description = entry.description or _description(entry)
    entry.training = {**entry.training, "imported": datetime.now(UTC).isoformat()[:19]}
    manifest.upsert(entry)
    manifest = Manifest.model_validate(manifest.model_dump())
    target = zoo / entry.weights
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(weights, tmp)
    tmp.chmod(0o644)
    tmp.replace(target)
    write_manifest(manifest, zoo)
    return entry, private


def import_results(
    results: Path,
    zoo: Path,
    runs: Path,
    *,
    public_slots: bool = False,
    half: bool = True,
    gate_settings: GateSettings | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Merge every model of a campaign's results that the gate lets through (all of them with
    ``force``) into ``zoo``; one summary row per model."""
    gate_settings = gate_settings or GateSettings()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    summary = results / SUMMARY
    teachers = json.loads(summary.read_text()).get("teachers", []) if summary.exists() else []
    rows = []
    for result in unpack(results, runs / stamp):
        row: dict[str, Any] = {"name": result.name, "folder": str(result.folder)}
        if result.name in teachers:
            row["teacher"] = True
            rows.append(row)
            continue
        try:
            verdict = gate(result, zoo, gate_settings)
            row["gate"] = verdict.reason()
            for comparison in verdict.comparisons:
                log.info("%s: %s", result.name, comparison.line())
            if not verdict.accepted and not force:
                row["refused"] = True
                rows.append(row)
                continue
            assert result.entry is not None
            row["forced"] = not verdict.accepted
            record = verdict.record() | {"forced": row["forced"]}
            result.entry.training = {**result.entry.training, "gate": record}
            entry, private = merge(result, zoo, public_slots=public_slots)
        except ResultsError as exc:
            row["error"] = str(exc)
            log.error("%s", exc)
            rows.append(row)
            continue
        row |= {
            "public_styles": [s.name for s in entry.styles if s.role == "style" and s.public],
            "kind": entry.kind,
            "factor": entry.factor,
            "iterations": entry.iterations,
            "hardware": entry.hardware,
            "wall_time_s": entry.wall_time_s,
            "private_slots": private,
        }
        if half:
            try:
                row["storage"] = store_half(entry.name, zoo)
            except StorageRefused as exc:
                row["storage"] = f"fp32 ({exc})"
        rows.append(row)
    return rows


def restore(results: Path, work: Path, stages: Sequence[str] = ()) -> list[str]:
    """Put each model's checkpoint (model + Adam state, ~5 MB) back into a campaign folder;
    only ``stages`` if given (all five are ~24 MiB, a large share of what may travel)."""
    restored = []
    scratch = work / "restore"
    for result in unpack(results, scratch):
        if stages and result.name not in stages:
            continue
        checkpoint = result.folder / "checkpoint.safetensors"
        if not checkpoint.exists():
            log.warning("%s: no checkpoint in its tar; it will start over", result.name)
            continue
        run = work / "runs" / result.name
        run.mkdir(parents=True, exist_ok=True)
        for name in ("checkpoint.safetensors", "checkpoint.json", "stage.json"):
            if (result.folder / name).exists():
                shutil.copyfile(result.folder / name, run / name)
        restored.append(result.name)
    shutil.rmtree(scratch, ignore_errors=True)
    return restored


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m training.gpu.results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="merge a campaign's results into the zoo")
    imp.add_argument("results", type=Path)
    imp.add_argument("--zoo", type=Path, default=Path("model_zoo"))
    imp.add_argument("--runs", type=Path, default=Path("runs/gpu"), help="unpacked results")
    imp.add_argument("--public-slots", action="store_true")
    imp.add_argument("--keep-fp32", action="store_true", help="do not store weights in fp16")
    imp.add_argument(
        "--names-out", type=Path, default=None, help="write the imported names (JSON) here"
    )
    imp.add_argument(
        "--force", action="store_true", help="merge even a net the gate finds worse than the zoo's"
    )
    defaults = GateSettings()
    imp.add_argument(
        "--gate-photos", type=Path, default=defaults.photos, help="held-out photos of the gate"
    )
    imp.add_argument("--gate-style-size", type=int, default=defaults.style_size)
    imp.add_argument("--gate-droplet-size", type=int, default=defaults.droplet_size)
    res = sub.add_parser("restore", help="put checkpoints back into a campaign folder")
    res.add_argument("results", type=Path)
    res.add_argument("--work", type=Path, default=Path(".campaign"))
    res.add_argument("--stages", default="", help="comma list (default: every model)")
    args = parser.parse_args(argv)
    if args.command == "restore":
        names = restore(args.results, args.work, [n for n in args.stages.split(",") if n])
        print(f"restored {', '.join(names) or 'nothing'} into {args.work}/runs")
        return 0 if names else 1
    settings = GateSettings(
        photos=args.gate_photos,
        style_size=args.gate_style_size,
        droplet_size=args.gate_droplet_size,
    )
    rows = import_results(
        args.results,
        args.zoo,
        args.runs,
        public_slots=args.public_slots,
        half=not args.keep_fp32,
        gate_settings=settings,
        force=args.force,
    )
    for row in rows:
        if row.get("teacher"):
            print(f"{row['name']:<12} a teacher: kept in {row['folder']}, not merged")
            continue
        if row.get("refused"):
            print(
                f"{row['name']:<12} REFUSED, the zoo keeps its net (--force to merge it; "
                f"kept in {row['folder']}): {row['gate']}"
            )
            continue
        if "error" in row:
            print(f"{row['name']:<12} NOT IMPORTED: {row['error']}")
            continue
        storage = row["storage"] if isinstance(row.get("storage"), str) else "fp16"
        private = (
            f"; private slots: {', '.join(row['private_slots'])}" if row["private_slots"] else ""
        )
        print(
            f"{row['name']:<12} {row['iterations']:>8} its on {row['hardware']}, "
            f"{row['wall_time_s']:.0f} s; weights {storage}{private}; "
            f"gate{' FORCED past' if row['forced'] else ''}: {row['gate']}"
        )
    if args.names_out:
        imported = [
            r for r in rows if "error" not in r and not r.get("teacher") and not r.get("refused")
        ]
        args.names_out.write_text(
            json.dumps(
                {
                    "sr": [r["name"] for r in imported if r["kind"] == "sr"],
                    "style": [r["name"] for r in imported if r["kind"] == "style"],
                    # what evaluation can name: private slots are not styles of the zoo
                    "public_styles": [n for r in imported for n in r["public_styles"]],
                }
            )
        )
    return 1 if any("error" in r for r in rows) or not rows else 0


if __name__ == "__main__":
    sys.exit(main())

"""The gate in front of the zoo: a new net replaces the shipped net of its name only if it is not
worse on held-out photos, both measured the same way in one process.

Why: an import of a GPU lease (``training.gpu.results``) and a promotion (``training.promote``)
replace the weights every user gets. A lease that diverged, a learning rate too high for a warm
start or a pack with other style images would otherwise ship without anyone looking. The full
evaluation (L-BFGS equivalence, ~13 minutes per net on this CPU) is too slow to run before every
replacement; these measures take seconds and move with it:

- a style (a single-style net, or each slot of a multi-style net that both nets have): the joint
  objective the trainer minimises, of the output at ``style_size`` px (centre squares), mean over
  the photos, computed with the *shipped* entry's weights and style image so that both nets are
  held to one objective (within ``objective_tolerance``, relative); and the droplets
  (``evaluation.droplets``) flagged at ``droplet_size`` px, summed over the photos (no more
  than the shipped net's);
- an SR net: with the training degradation, PSNR on Y for a pixel-loss net (at most
  ``psnr_tolerance_db`` lower), LPIPS for a feature-loss net (at most ``lpips_tolerance``
  higher) and its LR-grid pattern (``evaluation.metrics.grid_levels``; at most
  ``grid_tolerance`` levels more: the SR nets' droplets, which LPIPS barely registers).

The default photos are ``evaluation/photos`` (public domain / CC0, in no training set), so the
gate runs wherever the repository does. A measure that cannot be taken (a style image not found)
refuses the replacement: the caller's ``--force`` is the deliberate way past it.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from evaluation.common import REPO_ROOT, StyleUnderTest, styles_of_model
from evaluation.droplets import evaluate_droplets
from evaluation.gatys import objective_for, settings_from_entry, style_targets
from evaluation.lpips import LPIPS
from evaluation.sr import evaluate_sr
from evaluation.style import square_photo
from model_zoo.imaging import load_rgb, to_tensor
from model_zoo.manifest import ModelEntry, read_manifest
from model_zoo.reference import run_model
from model_zoo.registry import load_model
from training.data import find_images
from training.vgg import VGG16Features

log = logging.getLogger("evaluation.gate")

DEFAULT_GATE_PHOTOS = REPO_ROOT / "evaluation" / "photos"


@dataclass(frozen=True)
class GateSettings:
    """What the gate measures on, and how much worse than the shipped net is still noise."""

    photos: Path = DEFAULT_GATE_PHOTOS
    style_size: int = 256
    droplet_size: int = 512
    objective_tolerance: float = 0.01
    psnr_tolerance_db: float = 0.05
    lpips_tolerance: float = 0.002
    grid_tolerance: float = 0.1


@dataclass(frozen=True)
class Comparison:
    """One measure of both nets: ``subject`` is a style name or ``sr``."""

    subject: str
    measure: str
    shipped: float
    candidate: float
    limit: float
    """The worst value the candidate may have (the shipped value plus the tolerance)."""
    higher_is_better: bool = False

    @property
    def worse(self) -> bool:
        if self.higher_is_better:
            return self.candidate < self.limit
        return self.candidate > self.limit

    def line(self) -> str:
        verdict = "WORSE" if self.worse else "ok"
        return (
            f"{self.subject} {self.measure}: {self.candidate:.5g} vs shipped {self.shipped:.5g} "
            f"(limit {self.limit:.5g}) {verdict}"
        )


@dataclass
class Verdict:
    """Whether ``name`` may replace the shipped net, and the measures behind the answer."""

    name: str
    comparisons: list[Comparison] = field(default_factory=list)
    problem: str = ""
    """Why nothing could be measured (refuses); empty when the measures were taken."""
    note: str = ""

    @property
    def accepted(self) -> bool:
        return not self.problem and not any(c.worse for c in self.comparisons)

    def reason(self) -> str:
        if self.problem:
            return self.problem
        worse = [c.line() for c in self.comparisons if c.worse]
        return "; ".join(worse) if worse else self.note or "not worse on any measure"

    def record(self) -> dict[str, Any]:
        """What the manifest keeps of the decision (``training.replaced_gate``)."""
        return {
            "accepted": self.accepted,
            "note": self.note,
            "problem": self.problem,
            "comparisons": [asdict(c) | {"worse": c.worse} for c in self.comparisons],
        }


def check_replacement(
    name: str,
    candidate_zoo: Path,
    shipped_zoo: Path,
    settings: GateSettings | None = None,
    *,
    vgg: VGG16Features | None = None,
    lpips: LPIPS | None = None,
) -> Verdict:
    """May ``name`` of ``candidate_zoo`` replace ``name`` of ``shipped_zoo``? A name the shipped
    zoo does not have replaces nothing and passes."""
    settings = settings or GateSettings()
    verdict = Verdict(name)
    if name not in read_manifest(shipped_zoo).names():
        verdict.note = "no shipped net of this name: nothing to compare"
        return verdict
    candidate_net, candidate = load_model(name, root=candidate_zoo)
    shipped_net, shipped = load_model(name, root=shipped_zoo)
    if candidate.kind != shipped.kind:
        verdict.problem = f"a {candidate.kind} net cannot replace the shipped {shipped.kind} net"
        return verdict
    try:
        photos = find_images(settings.photos)
    except FileNotFoundError as exc:
        verdict.problem = f"cannot measure: {exc}"
        return verdict
    if candidate.kind == "sr":
        verdict.comparisons = _sr_comparisons(
            name, candidate_zoo, shipped_zoo, shipped, settings, lpips
        )
        return verdict
    new = {s.name: s for s in styles_of_model(candidate_net, candidate)}
    old = {s.name: s for s in styles_of_model(shipped_net, shipped)}
    common = [n for n in old if n in new]
    if not common:
        verdict.note = "no style in common with the shipped net: nothing to compare"
        return verdict
    vgg = vgg or VGG16Features()
    try:
        for style in common:
            verdict.comparisons += _style_comparisons(old[style], new[style], photos, settings, vgg)
    except (FileNotFoundError, ValueError) as exc:
        verdict.problem = f"cannot measure: {exc}"
    return verdict


def _style_comparisons(
    shipped: StyleUnderTest,
    candidate: StyleUnderTest,
    photos: Sequence[Path],
    settings: GateSettings,
    vgg: VGG16Features,
) -> list[Comparison]:
    objective_settings = settings_from_entry(shipped.entry, slot=shipped.slot)
    grams = style_targets(objective_settings, vgg)
    values: dict[str, list[float]] = {"shipped": [], "candidate": []}
    for path in photos:
        content = to_tensor(square_photo(load_rgb(path), settings.style_size))
        objective = objective_for(objective_settings, content, vgg, grams)
        for side, under_test in (("shipped", shipped), ("candidate", candidate)):
            output = run_model(under_test.net, content, "fp32", under_test.style)
            values[side].append(objective.value(output))
    before, after = statistics.fmean(values["shipped"]), statistics.fmean(values["candidate"])
    objective_row = Comparison(
        shipped.name,
        f"objective@{settings.style_size}",
        before,
        after,
        before * (1 + settings.objective_tolerance),
    )
    drops = []
    for under_test in (shipped, candidate):
        found = evaluate_droplets([under_test], list(photos), [settings.droplet_size])
        drops.append(found[under_test.name][str(settings.droplet_size)]["droplets"])
    droplet_row = Comparison(
        shipped.name, f"droplets@{settings.droplet_size}", drops[0], drops[1], drops[0]
    )
    return [objective_row, droplet_row]


def _sr_comparisons(
    name: str,
    candidate_zoo: Path,
    shipped_zoo: Path,
    shipped: ModelEntry,
    settings: GateSettings,
    lpips: LPIPS | None,
) -> list[Comparison]:
    metric = lpips or LPIPS()
    means = []
    for zoo in (shipped_zoo, candidate_zoo):
        rows = evaluate_sr(
            [name],
            [settings.photos.name],
            settings.photos.parent,
            root=str(zoo),
            device=torch.device("cpu"),
            lpips_model=metric,
        )
        mine = [r for r in rows if r.method == name]
        means.append(
            {
                "psnr": statistics.fmean(r.psnr for r in mine),
                "lpips": statistics.fmean(r.lpips for r in mine),
                "grid": statistics.fmean(r.grid for r in mine),
            }
        )
    before, after = means
    if shipped.loss == "pixel":
        return [
            Comparison(
                "sr",
                "psnr_y_db",
                before["psnr"],
                after["psnr"],
                before["psnr"] - settings.psnr_tolerance_db,
                higher_is_better=True,
            )
        ]
    return [
        Comparison(
            "sr",
            "lpips",
            before["lpips"],
            after["lpips"],
            before["lpips"] + settings.lpips_tolerance,
        ),
        Comparison(
            "sr",
            "grid_levels",
            before["grid"],
            after["grid"],
            before["grid"] + settings.grid_tolerance,
        ),
    ]

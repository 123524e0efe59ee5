"""The optimisation baseline the paper compares against (Gatys et al.): L-BFGS on the pixels.

The objective is the trainer's joint style-transfer objective, built from the same pieces
(``training.losses`` and the style task's ``style_grams`` for the Gram targets, so the style
image is loaded and resized exactly as in training):

    content_weight * l_feat(relu2_2; y, content) + style_weight * sum_j l_style(j; y, style)
    + tv_weight * l_TV(y)

:class:`JointObjective` scores *any* image, so a feed-forward output and an L-BFGS iterate are
measured with one function. Unlike the trainer, it computes the content target once, not per
call: an extra VGG pass per L-BFGS iteration would inflate the baseline's time.

Optimisation follows Johnson's own Gatys implementation (``neural-style``): plain L-BFGS
without line search (one objective + gradient evaluation per iteration, so "iterations" and
"evaluations" coincide), on unconstrained pixels, everything in fp32. The iterate may leave
[0, 1]; that only helps the baseline, so the comparison is conservative for the feed-forward
net.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch

from model_zoo.manifest import ModelEntry, StyleSlot
from training.losses import feature_loss, style_loss, tv_loss
from training.tasks.style import StyleSettings, style_grams
from training.vgg import CONTENT_LAYER, STYLE_LAYERS, VGG16Features

Init = Literal["content", "noise"]


class JointObjective:
    """The style-transfer objective for one content image and one style's Gram targets."""

    def __init__(
        self,
        vgg: VGG16Features,
        style_grams: Mapping[str, torch.Tensor],
        content: torch.Tensor,
        *,
        content_weight: float,
        style_weight: float,
        tv_weight: float,
    ) -> None:
        missing = set(STYLE_LAYERS) - set(vgg.layers)
        if missing or CONTENT_LAYER not in vgg.layers:
            raise ValueError(f"the loss network lacks layers {sorted(missing | {CONTENT_LAYER})}")
        self.vgg = vgg
        self.style_grams = {k: v.detach().float() for k, v in style_grams.items()}
        self.content = content.detach().float()
        self.weights = {"content": content_weight, "style": style_weight, "tv": tv_weight}
        with torch.no_grad():
            self.content_features = vgg(self.content)[CONTENT_LAYER].float()

    def terms(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted terms; differentiable w.r.t. ``image`` (1 x 3 x H x W, fp32)."""
        if image.shape != self.content.shape:
            raise ValueError(f"image {tuple(image.shape)} vs content {tuple(self.content.shape)}")
        feats = self.vgg(image)
        return {
            "content": self.weights["content"]
            * feature_loss(feats[CONTENT_LAYER], self.content_features),
            "style": self.weights["style"] * style_loss(feats, self.style_grams),
            "tv": self.weights["tv"] * tv_loss(image),
        }

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        t = self.terms(image)
        return t["content"] + t["style"] + t["tv"]

    def value(self, image: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self(image.float()))


def settings_from_entry(
    entry: ModelEntry,
    style_image: str | os.PathLike[str] | None = None,
    slot: StyleSlot | None = None,
) -> StyleSettings:
    """Rebuild a style model's training settings from its manifest ``training`` record; for a
    slot of a multi-style net, its own style image and weight replace the run's.

    ``style_image`` overrides the recorded path (it is relative to where training ran).
    """
    if entry.kind != "style":
        raise ValueError(f"{entry.name} is a {entry.kind} model, not a style model")
    known = {f.name for f in fields(StyleSettings)}
    record = {k: v for k, v in entry.training.items() if k in known}
    if slot is not None:
        record["style_image"] = slot.style_image
        if slot.style_weight is not None:
            record["style_weight"] = slot.style_weight
    for required in ("content_weight", "style_weight", "tv_weight"):
        if required not in record:
            raise ValueError(f"manifest entry {entry.name!r} records no {required}")
    record.update(task="style", name=entry.name)
    record.setdefault("data", entry.data.get("root", ""))
    record.setdefault("image_size", int(entry.data.get("crop", 256)))
    if style_image is not None:
        record["style_image"] = str(style_image)
    path = record.get("style_image")
    if path and not Path(path).exists():
        found = _find_style_image(Path(path))
        if found is not None:
            record["style_image"] = path = str(found)
    if not path or not Path(path).exists():
        raise FileNotFoundError(
            f"style image {path!r} of {entry.name!r} not found; pass it explicitly"
        )
    return StyleSettings(**record)


def _find_style_image(recorded: Path) -> Path | None:
    """The recorded path may be relative to where training ran (the repo) or absolute on another
    machine: try the repo, then the shared data's ``styles/`` tree by file name."""
    repo = Path(__file__).resolve().parent.parent
    if not recorded.is_absolute() and (repo / recorded).exists():
        return repo / recorded
    styles = repo.parent / "shared" / "data" / "styles"
    if styles.is_dir():
        for candidate in sorted(styles.rglob(recorded.name)):
            return candidate
    return None


def style_targets(settings: StyleSettings, vgg: VGG16Features) -> dict[str, torch.Tensor]:
    """The trainer's Gram targets (its own loading and resizing of the style image)."""
    assert settings.style_image is not None
    device = next(vgg.parameters()).device
    return style_grams(settings.style_image, settings.style_size, vgg, device)


def objective_for(
    settings: StyleSettings,
    content: torch.Tensor,
    vgg: VGG16Features,
    style_grams: Mapping[str, torch.Tensor] | None = None,
) -> JointObjective:
    """The joint objective with the trainer's style targets; pass ``style_grams`` (from
    :func:`style_targets`) to reuse them across many content images."""
    grams = style_grams if style_grams is not None else style_targets(settings, vgg)
    return JointObjective(
        vgg,
        grams,
        content,
        content_weight=settings.content_weight,
        style_weight=settings.style_weight,
        tv_weight=settings.tv_weight,
    )


def initial_image(content: torch.Tensor, init: Init, seed: int = 0) -> torch.Tensor:
    """``content``: the photo itself; ``noise``: uniform white noise in [0, 1] (Gatys et al.)."""
    if init == "content":
        return content.detach().clone().float()
    if init == "noise":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(content.shape, generator=generator).to(content.device)
    raise ValueError(f"unknown init {init!r}; use 'content' or 'noise'")


@dataclass
class GatysResult:
    """``objectives[k]`` is the objective after ``k`` iterations (``k = 0``: the initial image);
    ``times[k]`` the seconds spent producing iterate ``k`` (optimisation only, no set-up).
    ``image`` is the raw final iterate (``imaging.to_image`` clamps it for display)."""

    image: torch.Tensor
    objectives: list[float]
    times: list[float]
    final_terms: dict[str, float] = field(default_factory=dict)

    def iterations_to_reach(self, target: float) -> int | None:
        """First iteration whose objective is <= ``target``; None if never within the run."""
        for k, value in enumerate(self.objectives):
            if value <= target:
                return k
        return None


def run_lbfgs(
    objective: Callable[[torch.Tensor], torch.Tensor],
    init: torch.Tensor,
    iterations: int,
    *,
    history_size: int = 100,
    line_search: str | None = None,
    on_iteration: Callable[[int, float], None] | None = None,
) -> GatysResult:
    """Minimise ``objective`` over the pixels for ``iterations`` L-BFGS iterations (fp32).

    One ``step`` per iteration with ``max_iter=1``: the optimiser keeps its curvature history
    across calls, so this is ordinary L-BFGS that lets us read the objective and the clock
    after every iteration.
    """
    if iterations < 0:
        raise ValueError("iterations must be >= 0")
    # Contiguous: L-BFGS flattens gradients with view(), which fails on channels-last tensors
    # (``imaging.to_tensor`` returns a permuted view of the HxWx3 array).
    x = init.detach().float().clone(memory_format=torch.contiguous_format).requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [x],
        lr=1.0,
        max_iter=1,
        max_eval=25 if line_search else 1,
        history_size=history_size,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn=line_search,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = objective(x)
        loss.backward()
        return loss

    objectives: list[float] = []
    times = [0.0]
    elapsed = 0.0
    for k in range(iterations):
        start = time.perf_counter()
        loss = optimizer.step(closure)  # evaluates iterate k, then moves to k + 1
        elapsed += time.perf_counter() - start
        objectives.append(float(loss.detach()))
        times.append(elapsed)
        if on_iteration is not None:
            on_iteration(k, objectives[-1])
    with torch.no_grad():
        objectives.append(float(objective(x)))
    return GatysResult(image=x.detach(), objectives=objectives, times=times)


def stylize(
    objective: JointObjective,
    iterations: int,
    *,
    init: Init = "noise",
    seed: int = 0,
    line_search: str | None = None,
) -> GatysResult:
    """Gatys et al. style transfer of ``objective.content`` by L-BFGS from content or noise."""
    x0 = initial_image(objective.content, init, seed)
    result = run_lbfgs(objective, x0, iterations, line_search=line_search)
    with torch.no_grad():
        result.final_terms = {k: float(v) for k, v in objective.terms(result.image).items()}
    return result

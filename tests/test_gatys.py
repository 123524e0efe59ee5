"""The optimisation baseline: same objective as the trainer, and L-BFGS actually minimises it."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.gatys import (
    JointObjective,
    objective_for,
    run_lbfgs,
    settings_from_entry,
    stylize,
)
from model_zoo.config import SRNetConfig, StyleNetConfig
from model_zoo.imaging import to_tensor
from model_zoo.manifest import ModelEntry
from training.tasks.style import StyleSettings, StyleTask
from training.vgg import VGG16Features


@pytest.fixture(scope="module")
def vgg() -> VGG16Features:
    return VGG16Features()


@pytest.fixture()
def style_settings(tmp_path: Path) -> StyleSettings:
    rng = np.random.default_rng(0)
    path = tmp_path / "style.png"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return StyleSettings(
        task="style",
        name="t",
        data="",
        image_size=32,
        style_image=str(path),
        style_size=48,
        content_weight=1e5,
        style_weight=1e10,
        tv_weight=1e-5,
    )


def content_image(size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = 0.5 + 0.3 * torch.sin(xx / 3.0) * torch.cos(yy / 5.0)
    return torch.stack([base, base.flip(0), base.flip(1)]).unsqueeze(0).float()


def test_objective_equals_the_trainers(style_settings: StyleSettings, vgg: VGG16Features) -> None:
    content = content_image()
    objective = objective_for(style_settings, content, vgg)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    task = StyleTask(style_settings)
    task.prepare(vgg, content.device)
    # The trainer's loss with a "net" whose output is the image being scored.
    trainer_total, trainer_terms = task.loss(lambda _: image, content)
    assert objective.value(image) == pytest.approx(float(trainer_total), rel=1e-5)
    terms = objective.terms(image)
    for key in ("content", "style", "tv"):
        assert float(terms[key]) == pytest.approx(trainer_terms[key], rel=1e-5)
    # The content image itself has zero content loss but a style loss.
    own = objective.terms(content)
    assert float(own["content"]) == 0.0
    assert float(own["style"]) > 0.0


@pytest.mark.parametrize("init", ["content", "noise"])
def test_lbfgs_decreases_the_objective(
    style_settings: StyleSettings, vgg: VGG16Features, init: str
) -> None:
    objective = objective_for(style_settings, content_image(), vgg)
    result = stylize(objective, 12, init=init, seed=0)  # type: ignore[arg-type]
    assert len(result.objectives) == 13 and len(result.times) == 13
    # Plain L-BFGS (no line search) may overshoot on single steps, but must make progress.
    assert result.objectives[-1] < 0.5 * result.objectives[0]
    assert result.times == sorted(result.times) and result.times[0] == 0.0
    # The recorded last value really is the objective of the returned image.
    assert objective.value(result.image) == pytest.approx(result.objectives[-1], rel=1e-4)
    assert sum(result.final_terms.values()) == pytest.approx(result.objectives[-1], rel=1e-4)
    # Matching semantics: the first iterate at or below a target.
    target = result.objectives[6]
    k = result.iterations_to_reach(target)
    assert k is not None and k <= 6 and result.objectives[k] <= target
    assert all(v > target for v in result.objectives[:k])
    assert result.iterations_to_reach(-1.0) is None


def test_lbfgs_with_line_search_never_goes_up(
    style_settings: StyleSettings, vgg: VGG16Features
) -> None:
    objective = objective_for(style_settings, content_image(), vgg)
    result = stylize(objective, 6, init="content", line_search="strong_wolfe")
    assert all(b <= a for a, b in itertools.pairwise(result.objectives)), result.objectives
    assert result.objectives[-1] < result.objectives[0]


def test_noise_init_is_seeded_and_differs_from_content(
    style_settings: StyleSettings, vgg: VGG16Features
) -> None:
    objective = objective_for(style_settings, content_image(), vgg)
    a = stylize(objective, 0, init="noise", seed=3)
    b = stylize(objective, 0, init="noise", seed=3)
    c = stylize(objective, 0, init="content")
    torch.testing.assert_close(a.image, b.image)
    assert a.objectives[0] != c.objectives[0]


def test_photos_loaded_channels_last_can_be_optimised(
    style_settings: StyleSettings, vgg: VGG16Features
) -> None:
    photo = Image.fromarray((content_image()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    content = to_tensor(photo)
    assert not content.is_contiguous()
    result = stylize(objective_for(style_settings, content, vgg), 2, init="content")
    assert len(result.objectives) == 3


def test_lbfgs_solves_a_quadratic() -> None:
    target = torch.linspace(-1, 1, 12).reshape(1, 3, 2, 2)
    scales = torch.linspace(0.5, 4.0, 12).reshape(1, 3, 2, 2)
    result = run_lbfgs(lambda x: ((x - target) ** 2 * scales).sum(), torch.zeros_like(target), 25)
    torch.testing.assert_close(result.image, target, atol=1e-4, rtol=0)
    assert result.objectives[-1] < 1e-8


def test_objective_rejects_a_mismatched_image(
    style_settings: StyleSettings, vgg: VGG16Features
) -> None:
    objective: JointObjective = objective_for(style_settings, content_image(), vgg)
    with pytest.raises(ValueError):
        objective.value(torch.zeros(1, 3, 32, 30))


def _entry(kind: str, training: dict[str, object]) -> ModelEntry:
    arch = StyleNetConfig() if kind == "style" else SRNetConfig()
    return ModelEntry(name="m", kind=kind, arch=arch, weights="w", sha256="0", training=training)


def test_settings_come_from_the_manifest_record(style_settings: StyleSettings) -> None:
    record = {
        "content_weight": 2e5,
        "style_weight": 3e10,
        "tv_weight": 1e-6,
        "style_size": 48,
        "style_image": "/nonexistent/style.jpg",
        "precision": "bf16",
        "optimizer": "Adam",
    }
    settings = settings_from_entry(_entry("style", record), style_settings.style_image)
    assert (settings.content_weight, settings.style_weight, settings.tv_weight) == (2e5, 3e10, 1e-6)
    assert settings.style_image == style_settings.style_image
    with pytest.raises(FileNotFoundError):
        settings_from_entry(_entry("style", record))
    with pytest.raises(ValueError, match="style_weight"):
        settings_from_entry(_entry("style", {"content_weight": 1.0, "tv_weight": 0.0}))
    with pytest.raises(ValueError, match="not a style model"):
        settings_from_entry(_entry("sr", record))

"""The gate in front of the zoo (``evaluation.gate``): a net replaces the shipped net of its name
only if it is not worse on held-out photos, for imports of GPU results and for promotions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.cli import main as evaluation_cli
from evaluation.gate import GateSettings, check_replacement
from model_zoo.manifest import StyleSlot, read_manifest
from model_zoo.nets import ConditionalInstanceNorm2d, build_net
from model_zoo.registry import load_model, save_model, sha256_file
from training.gpu.results import import_results

from .conftest import TINY_MULTISTYLE

ROOT = Path(__file__).resolve().parents[1]
STYLE_TRAINING = {"content_weight": 1e5, "style_weight": 3e5, "tv_weight": 3.0, "style_size": 64}


def _image(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    base = (rng.random((5, 7, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(base).resize(size, Image.Resampling.BICUBIC).save(path)
    return path


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    for i in range(2):
        _image(tmp_path / "photos" / f"{i}.png", (96, 80), i)
    return tmp_path / "photos"


def _save_multi(zoo: Path, net: torch.nn.Module, paintings: Path) -> None:
    save_model(
        net,
        name="multi",
        kind="style",
        arch=TINY_MULTISTYLE,
        root=zoo,
        training=STYLE_TRAINING,
        styles=[
            StyleSlot(name="identity", index=0, role="identity"),
            StyleSlot(name="ms_a", index=1, style_image=str(paintings / "a.png")),
            StyleSlot(name="ms_b", index=2, style_image=str(paintings / "b.png")),
        ],
    )


def _copy_model(name: str, source: Path, target: Path, change=None) -> Path:  # type: ignore[no-untyped-def]
    """``name`` of ``source`` saved into ``target`` under the same entry, weights changed by
    ``change(net)`` first."""
    net, entry = load_model(name, root=source)
    if change is not None:
        with torch.no_grad():
            change(net)
    fields = entry.model_dump(
        exclude={"name", "kind", "arch", "weights", "sha256", "num_parameters", "created"}
    )
    save_model(net, name=name, kind=entry.kind, arch=entry.arch, root=target, **fields)
    return target


def _shout_ms_b(net: torch.nn.Module) -> None:
    """Slot 2's scales x30 in every layer: saturated noise for ms_b, ms_a untouched."""
    for module in net.modules():
        if isinstance(module, ConditionalInstanceNorm2d):
            module.scale[2] *= 30.0


def _multi_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A zoo with a tiny (seeded) multi-style net, and a zoo with it broken for ms_b."""
    paintings = tmp_path / "paintings"
    _image(paintings / "a.png", (96, 96), 10)
    _image(paintings / "b.png", (96, 96), 11)
    torch.manual_seed(0)
    shipped = tmp_path / "shipped"
    _save_multi(shipped, build_net(TINY_MULTISTYLE), paintings)
    return shipped, _copy_model("multi", shipped, tmp_path / "broken", _shout_ms_b)


def test_a_style_net_is_held_to_the_shipped_objective_slot_by_slot(
    photos: Path, tmp_path: Path
) -> None:
    shipped, broken = _multi_pair(tmp_path)
    settings = GateSettings(photos=photos, style_size=48, droplet_size=64)

    same = _copy_model("multi", shipped, tmp_path / "same")
    verdict = check_replacement("multi", same, shipped, settings)
    assert verdict.accepted, verdict.reason()
    measures = {(c.subject, c.measure): c for c in verdict.comparisons}
    assert set(measures) == {
        (style, measure)
        for style in ("ms_a", "ms_b")
        for measure in ("objective@48", "droplets@64")
    }  # the identity slot is no style to compare
    assert all(c.candidate == c.shipped for c in verdict.comparisons)
    assert measures["ms_a", "objective@48"].shipped > 0

    verdict = check_replacement("multi", broken, shipped, settings)
    assert not verdict.accepted
    worse = {(c.subject, c.measure) for c in verdict.comparisons if c.worse}
    assert worse == {("ms_b", "objective@48")}, verdict.reason()
    assert "ms_b objective@48" in verdict.reason()
    # ... and the other way round, the noisy net is the one replaced: accepted.
    assert check_replacement("multi", shipped, broken, settings).accepted

    # The command line asks the same question (exit 1: refused).
    ask = ["gate", "--model", "multi", "--zoo", str(shipped), "--photos", str(photos),
           "--style-size", "48", "--droplet-size", "64"]  # fmt: skip
    assert evaluation_cli([*ask, "--candidate-zoo", str(broken)]) == 1
    assert evaluation_cli([*ask, "--candidate-zoo", str(same)]) == 0

    # What the gate cannot measure refuses: the painting is gone.
    (tmp_path / "paintings" / "b.png").unlink()
    verdict = check_replacement("multi", same, shipped, settings)
    assert not verdict.accepted and "b.png" in verdict.problem
    empty = tmp_path / "no-photos"
    empty.mkdir()
    verdict = check_replacement("multi", same, shipped, GateSettings(photos=empty))
    assert not verdict.accepted and "no images" in verdict.problem
    # A name the shipped zoo lacks replaces nothing.
    fresh = check_replacement("multi", same, tmp_path / "empty", settings)
    assert fresh.accepted and "nothing to compare" in fresh.note


def _results_dir(zoo: Path, name: str, out: Path) -> Path:
    """A campaign's OUT_DIR holding ``name`` of ``zoo`` as the export packs it."""
    entry = read_manifest(zoo).get(name)
    folder = out / "build" / name
    (folder / "weights").mkdir(parents=True)
    shutil.copyfile(zoo / entry.weights, folder / entry.weights)
    (folder / "entry.json").write_text(entry.model_dump_json())
    with tarfile.open(out / f"{name}.tar", "w") as tar:
        tar.add(folder, arcname=name)
    shutil.rmtree(out / "build")
    (out / "summary.json").write_text(json.dumps({"files": [f"{name}.tar"], "teachers": []}))
    return out


def test_an_import_keeps_the_zoos_sr_net_when_the_new_one_is_worse(
    tiny_zoo: Path, photos: Path, tmp_path: Path
) -> None:
    """The zoo's x4 adds nothing to bicubic (its residual head zeroed); the tiny untrained x4
    adds noise to it, which LPIPS finds worse."""
    settings = GateSettings(photos=photos)
    zoo = _copy_model("x4", tiny_zoo, tmp_path / "zoo", lambda net: net.tail.conv.weight.zero_())
    shipped_sha = read_manifest(zoo).get("x4").sha256
    (row,) = import_results(
        _results_dir(tiny_zoo, "x4", tmp_path / "out-worse"), zoo, tmp_path / "runs",
        gate_settings=settings,
    )  # fmt: skip
    assert row.get("refused") and "sr lpips" in row["gate"], row
    assert read_manifest(zoo).get("x4").sha256 == shipped_sha  # the zoo kept its net
    assert sha256_file(zoo / "weights" / "x4.safetensors") == shipped_sha
    assert (Path(row["folder"]) / "entry.json").exists()  # the refused one is kept to look at
    # The script around it: nothing merged, so no evaluation, gallery or thumbnails either.
    script = subprocess.run(
        ["bash", "scripts/gpu_import.sh", str(tmp_path / "out-worse"), "--zoo", str(zoo),
         "--docs", str(tmp_path / "docs"), "--runs", str(tmp_path / "runs"),
         "--gate-photos", str(photos)],
        cwd=ROOT, env=os.environ | {"PYTHON": sys.executable}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert script.returncode == 0, script.stdout + script.stderr
    assert "x4           REFUSED" in script.stdout and "nothing merged" in script.stdout
    assert not (tmp_path / "docs").exists()
    assert read_manifest(zoo).get("x4").sha256 == shipped_sha

    # --force merges it, and the entry records that the gate said no.
    (row,) = import_results(
        _results_dir(tiny_zoo, "x4", tmp_path / "out-forced"), zoo, tmp_path / "runs",
        gate_settings=settings, force=True, half=False,
    )  # fmt: skip
    assert "refused" not in row and "error" not in row, row
    entry = read_manifest(zoo).get("x4")
    assert entry.sha256 == read_manifest(tiny_zoo).get("x4").sha256
    gate = entry.training["gate"]
    assert gate["forced"] and not gate["accepted"]
    lpips, grid = gate["comparisons"]
    assert lpips["measure"] == "lpips" and lpips["candidate"] > lpips["limit"]
    # and its pattern on the LR grid, the SR nets' droplets (no more than 0.1 level above)
    assert grid["measure"] == "grid_levels" and grid["shipped"] > 0
    assert grid["limit"] == pytest.approx(grid["shipped"] + 0.1)

    # The net it replaced, imported back over it, is the better one: accepted without force.
    back = _copy_model("x4", tiny_zoo, tmp_path / "back", lambda net: net.tail.conv.weight.zero_())
    (row,) = import_results(
        _results_dir(back, "x4", tmp_path / "out-back"), zoo, tmp_path / "runs",
        gate_settings=settings, half=False,
    )  # fmt: skip
    assert "refused" not in row, row
    assert read_manifest(zoo).get("x4").sha256 == read_manifest(back).get("x4").sha256
    assert not read_manifest(zoo).get("x4").training["gate"]["forced"]


def test_a_promotion_that_would_replace_a_better_net_is_refused(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.promote import main as promote

    shipped, broken = _multi_pair(tmp_path)
    before = read_manifest(shipped).get("multi").sha256
    argv = ["--from", str(broken), "--model", "multi", "--to", str(shipped), "--keep-fp32",
            "--description", "ms_b broken", "--gate-photos", str(photos)]  # fmt: skip
    assert promote(argv) == 2
    assert "ms_b objective@256" in capsys.readouterr().err
    assert read_manifest(shipped).get("multi").sha256 == before  # nothing changed
    assert promote([*argv, "--force"]) == 0
    assert "ms_b objective@256" in capsys.readouterr().out  # said, even when forced
    entry = read_manifest(shipped).get("multi")
    assert entry.sha256 == read_manifest(broken).get("multi").sha256
    assert entry.training["gate"]["forced"] and not entry.training["gate"]["accepted"]

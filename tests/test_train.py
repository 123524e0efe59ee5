"""Trainer smoke runs on tiny generated photos: zoo entry written, loadable, resumable."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from model_zoo.manifest import IDENTITY_MIN_PSNR_DB, Manifest, read_manifest
from model_zoo.registry import load_model, sha256_file
from model_zoo.styles import resolve_style
from training import cli as train
from training.data import ImageFolderCrops, degrade
from training.gpu.fastloop import train_stage
from training.schedule import (
    apply_lr,
    budget_decay,
    check_decay_fractions,
    check_milestones,
    lr_scale,
)
from training.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def photo_dir(tmp_path: Path) -> Path:
    """A handful of tiny smooth 'photos' in nested folders, plus one unreadable file."""
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(6):
        sub = folder / f"set{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        base = rng.random((6, 8, 3))
        img = Image.fromarray((base * 255).astype(np.uint8)).resize((56, 40), Image.BICUBIC)
        img.save(sub / f"p{i}.{'jpg' if i % 2 else 'png'}")
    (folder / "set0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.fixture()
def style_image(tmp_path: Path) -> Path:
    path = tmp_path / "style.png"
    stripes = np.zeros((48, 48, 3), dtype=np.uint8)
    stripes[::4] = (230, 40, 30)
    stripes[1::4] = (20, 60, 200)
    Image.fromarray(stripes).save(path)
    return path


def run(argv: list[str]) -> dict[str, object]:
    assert train.main(argv) == 0
    return {}


def test_style_training_writes_loadable_zoo_entry(
    photo_dir: Path, style_image: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    zoo, runs = tmp_path / "zoo", tmp_path / "runs"
    with caplog.at_level(logging.WARNING):
        run(_style_args(photo_dir, style_image, tmp_path, "stripes", "--iterations", "3"))
    assert any("broken.jpg" in r.message for r in caplog.records), "unreadable file not reported"
    entry = read_manifest(zoo).get("stripes")
    assert entry.kind == "style" and entry.iterations == 3
    assert entry.sha256 == sha256_file(zoo / entry.weights)
    assert entry.training["content_weight"] == 1e5 and entry.training["style_image"]
    assert "factor" not in entry.training and "loss" not in entry.training
    assert set(entry.final_losses) == {"total", "content", "style", "tv"}
    assert entry.data["images"] == 6
    net, _ = load_model("stripes", root=zoo)
    assert net(torch.rand(1, 3, 19, 23)).shape == (1, 3, 19, 23)
    assert (runs / "stripes" / "samples.jpg").exists()
    # Style runs are also shown at twice the crop, where texture scale reads differently.
    large = Image.open(runs / "stripes" / "samples_64.jpg")
    assert large.width == 2 * 64 and large.height % 64 == 0 and large.height >= 64
    assert (runs / "stripes" / "loss_curve.png").exists()


@pytest.mark.parametrize(
    ("loss", "output"), [("feat", "tanh"), ("pixel", "tanh"), ("feat", "bicubic_residual")]
)
def test_sr_training_writes_loadable_zoo_entry(
    photo_dir: Path, tmp_path: Path, loss: str, output: str
) -> None:
    zoo = tmp_path / "zoo"
    run(
        [
            "sr",
            "--name",
            f"x4_{loss}",
            "--factor",
            "4",
            "--loss",
            loss,
            "--output",
            output,
            "--data",
            str(photo_dir),
            "--image-size",
            "32",
            "--batch-size",
            "2",
            "--iterations",
            "2",
            "--zoo",
            str(zoo),
            "--run-dir",
            str(tmp_path / "runs"),
            "--quiet",
        ]
    )
    entry = read_manifest(zoo).get(f"x4_{loss}")
    assert entry.kind == "sr" and entry.factor == 4 and entry.loss == loss
    assert entry.arch.output == output  # type: ignore[union-attr]
    assert entry.training["content_weight"] == 1e5
    assert "style_weight" not in entry.training and "style_image" not in entry.training
    net, _ = load_model(f"x4_{loss}", root=zoo)
    assert net(torch.rand(1, 3, 8, 9)).shape == (1, 3, 32, 36)


def test_resume_continues_from_checkpoint(photo_dir: Path, tmp_path: Path) -> None:
    zoo, runs = tmp_path / "zoo", tmp_path / "runs"
    common = [
        "sr",
        "--name",
        "x4",
        "--data",
        str(photo_dir),
        "--image-size",
        "32",
        "--batch-size",
        "1",
        "--loss",
        "pixel",
        "--zoo",
        str(zoo),
        "--run-dir",
        str(runs),
        "--quiet",
        "--checkpoint-every",
        "1",
    ]
    run([*common, "--iterations", "2"])
    history = json.loads((runs / "x4" / "checkpoint.json").read_text())
    assert history["iteration"] == 2
    run([*common, "--iterations", "4", "--resume", "--lr", "5e-4"])
    entry = read_manifest(zoo).get("x4")
    assert entry.iterations == 4
    # The lr change on resume is recorded as a second training phase.
    assert [(p["from_iteration"], p["lr"]) for p in entry.training["phases"]] == [
        (0, 1e-3),
        (2, 5e-4),
    ]
    history = json.loads((runs / "x4" / "checkpoint.json").read_text())["history"]
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]


def test_lr_schedule_warms_up_then_drops_at_each_milestone() -> None:
    scales = [lr_scale(i, warmup=2, milestones=(3, 5), gamma=0.5) for i in range(7)]
    assert scales == [0.5, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert [lr_scale(i, 0, (), 0.1) for i in (0, 10_000)] == [1.0, 1.0]
    for milestones, gamma in [((3, 2), 0.5), ((2, 2), 0.5), ((0,), 0.5), ((2,), 0.0), ((2,), 2)]:
        with pytest.raises(ValueError, match="--lr-"):
            check_milestones(milestones, gamma)


def test_budget_decay_steps_down_in_time_and_refuses_what_cannot_mean_a_schedule() -> None:
    at = (0.6, 0.85)
    assert [budget_decay(f, at, 0.5) for f in (0.0, 0.59, 0.6, 0.84, 0.85, 1.2)] == [
        1.0, 1.0, 0.5, 0.5, 0.25, 0.25,
    ]  # fmt: skip
    assert budget_decay(0.99, (), 0.1) == 1.0
    check_decay_fractions((), 0.3)
    for fractions, gamma in [((0.9, 0.5), 0.3), ((0.5, 0.5), 0.3), ((0.0,), 0.3),
                             ((1.0,), 0.3), ((0.5,), 0.0), ((0.5,), 1.5)]:  # fmt: skip
        with pytest.raises(ValueError, match="--lr-decay-"):
            check_decay_fractions(fractions, gamma)


def test_a_rate_held_as_a_tensor_is_written_in_place_and_adam_follows_it() -> None:
    """What lets a decay reach a captured CUDA graph: the optimizer keeps the very tensor (a
    graph reads its memory), and the next step moves the weights at the new rate."""
    settings = TrainSettings(task="sr", name="x4", data=".", image_size=32, lr=0.1)
    weights = torch.nn.Parameter(torch.ones(8))
    rate = torch.tensor(0.1)
    optimizer = torch.optim.Adam([{"params": [weights], "lr": rate, "lr_scale": 0.5}], lr=0.1)
    assert apply_lr(optimizer, settings, iteration=0, decay=0.0) == 0.0
    assert optimizer.param_groups[0]["lr"] is rate and float(rate) == 0.0
    weights.grad = torch.ones(8)
    optimizer.step()
    assert torch.equal(weights.detach(), torch.ones(8)), "a step at rate 0 moved the weights"
    assert apply_lr(optimizer, settings, iteration=0, decay=0.3) == pytest.approx(0.03)
    assert optimizer.param_groups[0]["lr"] is rate and float(rate) == pytest.approx(0.015)
    optimizer.step()  # Adam's first moves are the rate itself, whatever the gradient's size
    assert torch.allclose(weights.detach(), torch.full((8,), 1 - 0.015), atol=1e-6)
    floats = torch.optim.Adam([{"params": [weights], "lr": 1.0, "lr_scale": 2.0}], lr=1.0)
    assert apply_lr(floats, settings, iteration=0, decay=0.5) == pytest.approx(0.05)
    assert floats.param_groups[0]["lr"] == pytest.approx(0.1)  # the CPU trainer's floats


def test_milestones_lower_the_lr_of_a_run_and_of_its_resume(
    photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rate the optimizer used is what the checkpoint says; a resume lands on the same
    schedule (it is a function of the iteration), and the manifest records it."""
    args = _sr_args(photo_dir, tmp_path, "x4", "--loss", "pixel", "--lr", "1e-2",
                    "--lr-milestones", "2", "3", "--lr-gamma", "0.5")  # fmt: skip
    meta = tmp_path / "runs" / "x4" / "checkpoint.json"
    run([*args, "--iterations", "2"])
    assert json.loads(meta.read_text())["lr"] == 1e-2  # the step to iteration 2: none passed
    run([*args, "--iterations", "4", "--resume"])
    assert json.loads(meta.read_text())["lr"] == 2.5e-3  # both milestones passed
    entry = read_manifest(tmp_path / "zoo").get("x4")
    assert entry.training["lr_milestones"] == [2, 3] and entry.training["lr_gamma"] == 0.5
    assert entry.training["phases"][0]["lr_milestones"] == [2, 3]
    with pytest.raises(SystemExit) as exit_info:  # refused before anything is read
        train.main(_sr_args(photo_dir, tmp_path, "bad", "--lr-milestones", "5", "3"))
    assert exit_info.value.code == 2 and "--lr-milestones must increase" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "bad").exists()
    # The GPU campaign's loop replays one captured lr: it refuses milestones outright.
    gpu_args = train.build_parser().parse_args(
        _sr_args(photo_dir, tmp_path, "x4g", "--lr-milestones", "9")
    )
    with pytest.raises(ValueError, match="--lr-milestones is for the iteration-bound trainer"):
        train_stage(train.settings_from_args(gpu_args), None, None)  # type: ignore[arg-type]


def test_a_weight_average_is_exported_and_continued_on_resume(
    photo_dir: Path, tmp_path: Path
) -> None:
    zoo, runs = tmp_path / "zoo", tmp_path / "runs"
    common = ["sr", "--name", "x4", "--data", str(photo_dir), "--image-size", "32",
              "--batch-size", "1", "--loss", "feat", "--zoo", str(zoo), "--run-dir", str(runs),
              "--quiet", "--lr", "1e-2", "--ema-decay", "0.5"]  # fmt: skip
    run([*common, "--iterations", "3"])
    checkpoint = runs / "x4" / "checkpoint.safetensors"
    with safe_open(str(checkpoint), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert int(tensors["ema.n_averaged"]) == 3
    net, entry = load_model("x4", root=zoo)
    exported = net.state_dict()
    # The export is the average (BN statistics included), not the last step's weights.
    for name, value in exported.items():
        if value.is_floating_point():
            assert torch.allclose(value, tensors[f"ema.module.{name}"].float(), atol=1e-6), name
    moved = max(
        float((value - tensors[f"model.{name}"].float()).abs().max())
        for name, value in exported.items()
        if value.is_floating_point()
    )
    assert moved > 1e-3, "the exported weights are the last step's"
    assert entry.training["ema_decay"] == 0.5 and entry.training["phases"][0]["ema_decay"] == 0.5

    # A resume continues the average instead of restarting it at the resumed weights.
    run([*common, "--iterations", "5", "--resume"])
    with safe_open(str(checkpoint), "pt") as f:
        assert int(f.get_tensor("ema.n_averaged")) == 5


def test_export_only_writes_the_checkpoint_into_a_zoo_and_leaves_the_run_alone(
    photo_dir: Path, tmp_path: Path
) -> None:
    """How a run that is still training gets gated: its checkpoint into a zoo of its own,
    exactly (last step's weights, or the average where asked), the run folder untouched."""
    zoo, runs = tmp_path / "zoo", tmp_path / "runs"
    common = ["sr", "--name", "x4", "--data", str(photo_dir), "--image-size", "32",
              "--batch-size", "1", "--loss", "pixel", "--run-dir", str(runs), "--quiet",
              "--lr", "1e-2"]  # fmt: skip
    run([*common, "--zoo", str(zoo), "--iterations", "3", "--ema-decay", "0.5"])
    folder = runs / "x4"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with safe_open(str(folder / "checkpoint.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    # The command line of a later leg (another lr, more iterations) changes nothing exported.
    raw_zoo, average_zoo = tmp_path / "raw", tmp_path / "average"
    later = ["--iterations", "50", "--lr", "5e-4", "--export-only"]
    run([*common, "--zoo", str(raw_zoo), *later])
    run([*common, "--zoo", str(average_zoo), *later, "--ema-decay", "0.5"])

    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    for exported_zoo, prefix in ((raw_zoo, "model."), (average_zoo, "ema.module.")):
        net, entry = load_model("x4", root=exported_zoo)
        for name, value in net.state_dict().items():
            if value.is_floating_point():
                assert torch.equal(value, tensors[prefix + name].float()), (prefix, name)
        assert entry.iterations == 3 and entry.training["interrupted"] is True
        assert [p["lr"] for p in entry.training["phases"]] == [1e-2]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main([*common, "--name", "x8_none", "--factor", "8", "--zoo", str(raw_zoo),
                    "--export-only"])  # fmt: skip


def test_ctrl_c_leaves_checkpoint_and_usable_model(photo_dir: Path, tmp_path: Path) -> None:
    zoo, runs = tmp_path / "zoo", tmp_path / "runs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training",
            "sr",
            "--name",
            "x4",
            "--data",
            str(photo_dir),
            "--image-size",
            "32",
            "--batch-size",
            "1",
            "--loss",
            "pixel",
            "--iterations",
            "100000",
            "--checkpoint-every",
            "1",
            "--zoo",
            str(zoo),
            "--run-dir",
            str(runs),
            "--quiet",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    checkpoint = runs / "x4" / "checkpoint.json"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), proc.communicate()[0].decode()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output.decode()
    entry = read_manifest(zoo).get("x4")
    assert 1 <= entry.iterations < 100000 and entry.training["interrupted"] is True
    assert json.loads(checkpoint.read_text())["iteration"] == entry.iterations
    load_model("x4", root=zoo)


def test_sr_degradation_blurs_then_downsamples() -> None:
    hr = torch.zeros(1, 3, 16, 16)
    hr[..., 8:, :] = 1.0
    lr = degrade(hr, 4)
    assert lr.shape == (1, 3, 4, 4)
    column = lr[0, 0, :, 0]
    assert column[0] < 0.05 and column[-1] > 0.95 and 0.05 < column[1:3].mean() < 0.95


def test_dataset_crops_have_training_size(photo_dir: Path) -> None:
    data = ImageFolderCrops(photo_dir, 24)
    crops = [data[i] for i in range(len(data))]
    assert all(c.shape == (3, 24, 24) for c in crops)


def _sr_args(photo_dir: Path, tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "sr", "--name", name, "--data", str(photo_dir), "--image-size", "32",
        "--batch-size", "2", "--output", "bicubic_residual", "--zoo", str(tmp_path / "zoo"),
        "--run-dir", str(tmp_path / "runs"), "--quiet", *extra,
    ]  # fmt: skip


def test_feature_run_can_start_from_the_pixel_model_with_a_pixel_term(
    photo_dir: Path, tmp_path: Path
) -> None:
    zoo = tmp_path / "zoo"
    run(_sr_args(photo_dir, tmp_path, "px", "--loss", "pixel", "--iterations", "2"))
    # Zero steps: the exported net is exactly the one it started from.
    run(_sr_args(photo_dir, tmp_path, "same", "--init-from", "px", "--iterations", "0"))
    source, _ = load_model("px", root=zoo)
    copy, _ = load_model("same", root=zoo)
    for (key, a), b in zip(source.state_dict().items(), copy.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=key)
    run(
        _sr_args(
            photo_dir, tmp_path, "ft", "--init-from", "px", "--pixel-weight", "1e7",
            "--iterations", "1",
        )
    )  # fmt: skip
    entry = read_manifest(zoo).get("ft")
    assert entry.training["init_from"] == "px" and entry.training["pixel_weight"] == 1e7
    assert set(entry.final_losses) == {"total", "feat", "pixel", "tv"}
    assert entry.final_losses["pixel"] > 0


def test_fine_tuned_models_record_the_runs_behind_their_weights(
    photo_dir: Path, tmp_path: Path
) -> None:
    zoo = tmp_path / "zoo"
    run(_sr_args(photo_dir, tmp_path, "px", "--loss", "pixel", "--iterations", "2"))
    parent = read_manifest(zoo).get("px")
    assert parent.training["lineage"] == [] and parent.training["total_iterations"] == 2
    # A fine-tune that replaces its own parent's entry (--init-from x --name x), stopped and
    # resumed: the parent's run is still on record, once, with its own settings.
    run(_sr_args(photo_dir, tmp_path, "px", "--init-from", "px", "--iterations", "1"))
    run(_sr_args(photo_dir, tmp_path, "px", "--init-from", "px", "--iterations", "3", "--resume"))
    child = read_manifest(zoo).get("px")
    assert [r["name"] for r in child.training["lineage"]] == ["px"]
    first = child.training["lineage"][0]
    assert first["sha256"] == parent.sha256 and first["iterations"] == 2
    assert first["loss"] == "pixel" and first["hardware"] == parent.hardware
    assert child.iterations == 3 and child.training["total_iterations"] == 5
    # A resume need not repeat --init-from: the checkpoint remembers the parent.
    run(_sr_args(photo_dir, tmp_path, "px", "--iterations", "4", "--resume"))
    resumed = read_manifest(zoo).get("px")
    assert resumed.training["init_from"] == "px" and resumed.training["lineage"][0] == first
    # The chain grows across names: a third run inherits both earlier runs.
    run(_sr_args(photo_dir, tmp_path, "ft", "--init-from", "px", "--iterations", "1"))
    grandchild = read_manifest(zoo).get("ft")
    assert [r["sha256"] for r in grandchild.training["lineage"]] == [
        parent.sha256,
        resumed.sha256,
    ]
    assert grandchild.training["total_iterations"] == 7


def test_init_from_a_model_of_another_architecture_is_refused(
    photo_dir: Path, tmp_path: Path
) -> None:
    run(_sr_args(photo_dir, tmp_path, "px4", "--loss", "pixel", "--iterations", "1"))
    with pytest.raises(ValueError, match="architecture"):
        run(
            _sr_args(
                photo_dir, tmp_path, "x8", "--factor", "8", "--init-from", "px4",
                "--iterations", "1",
            )
        )  # fmt: skip


def _style_args(
    photo_dir: Path, style_image: Path, tmp_path: Path, name: str, *extra: str
) -> list[str]:
    return [
        "style", "--name", name, "--data", str(photo_dir), "--style-image", str(style_image),
        "--image-size", "32", "--batch-size", "2", "--style-size", "48",
        "--zoo", str(tmp_path / "zoo"), "--run-dir", str(tmp_path / "runs"), "--quiet", *extra,
    ]  # fmt: skip


def test_a_new_style_can_start_from_a_trained_style_net(
    photo_dir: Path, style_image: Path, tmp_path: Path
) -> None:
    zoo = tmp_path / "zoo"
    run(_style_args(photo_dir, style_image, tmp_path, "first", "--iterations", "2"))
    run(
        _style_args(
            photo_dir, style_image, tmp_path, "second", "--init-from", "first",
            "--iterations", "0",
        )
    )  # fmt: skip
    source, _ = load_model("first", root=zoo)
    copy, entry = load_model("second", root=zoo)
    for (key, a), b in zip(source.state_dict().items(), copy.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=key)
    assert entry.training["init_from"] == "first"
    # A batch-norm style net is another architecture: refused, not silently half-loaded.
    with pytest.raises(ValueError, match="architecture"):
        run(
            _style_args(
                photo_dir, style_image, tmp_path, "bn", "--init-from", "first",
                "--norm", "batch", "--iterations", "1",
            )
        )  # fmt: skip


# --- the multi-style family ---------------------------------------------------------------------


def _multi_args(photo_dir: Path, tmp_path: Path, name: str, *extra: str) -> list[str]:
    styles = tmp_path / "styles"
    styles.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    for style in ("reds", "blues"):
        if not (styles / f"{style}.png").exists():
            base = rng.random((6, 6, 3)) * (0.4 if style == "blues" else 1.0)
            base[..., 0 if style == "reds" else 2] = 1.0
            Image.fromarray((base * 255).astype(np.uint8)).resize((48, 48)).save(
                styles / f"{style}.png"
            )
    return [
        "multistyle", "--name", name, "--data", str(photo_dir),
        "--style-images", f"reds={styles / 'reds.png'}", str(styles / "blues.png"),
        "--channels", "8", "8", "8", "--num-residual", "1",
        "--image-size", "32", "--batch-size", "3", "--style-size", "48",
        "--saturation-penalty", "10", "--zoo", str(tmp_path / "zoo"),
        "--run-dir", str(tmp_path / "runs"), "--quiet", *extra,
    ]  # fmt: skip


def test_multistyle_training_records_its_slots_and_resumes(photo_dir: Path, tmp_path: Path) -> None:
    zoo, runs = tmp_path / "zoo", tmp_path / "runs"
    run(_multi_args(photo_dir, tmp_path, "multi", "--iterations", "3", "--checkpoint-every", "2"))
    run(_multi_args(photo_dir, tmp_path, "multi", "--iterations", "5", "--resume"))
    entry = read_manifest(zoo).get("multi")
    assert entry.kind == "style" and entry.arch.kind == "multistyle"  # type: ignore[union-attr]
    assert [(s.name, s.index, s.role) for s in entry.styles] == [
        ("identity", 0, "identity"),
        ("reds", 1, "style"),
        ("blues", 2, "style"),
    ]
    assert entry.iterations == 5 and set(read_manifest(zoo).styles()) == {"reds", "blues"}
    # Every step logs the same terms, identity sample or not (the loss curve needs it).
    history = json.loads((runs / "multi" / "checkpoint.json").read_text())["history"]
    assert [h["iteration"] for h in history] == [1, 2, 3, 4, 5]
    assert all({"content", "style", "tv", "saturation", "identity"} <= set(h) for h in history)
    assert set(entry.final_losses) >= {"content", "style", "identity", "saturation"}
    net, _ = load_model("multi", root=zoo)
    x = torch.rand(1, 3, 24, 28)
    with torch.no_grad():
        outputs = [net(x, net.one_hot(i)) for i in range(3)]
    assert outputs[0].shape == (1, 3, 24, 28)
    assert (outputs[1] - outputs[2]).abs().max() > 1e-4  # the styles differ
    # samples: the photo, then every slot (identity included), at the crop and twice it
    grid = Image.open(runs / "multi" / "samples.jpg")
    assert grid.width == 4 * 32 and grid.height % 32 == 0
    assert Image.open(runs / "multi" / "samples_64.jpg").width == 4 * 64


def test_a_run_whose_export_the_zoo_would_refuse_fails_before_training(
    photo_dir: Path, style_image: Path, tmp_path: Path
) -> None:
    """A single-style net offers ``reds``; a multi-style run with a public ``reds`` slot into
    that zoo must stop at once (it used to train to the end, then fail to export)."""
    run(_style_args(photo_dir, style_image, tmp_path, "reds", "--iterations", "1"))
    with pytest.raises(ValueError, match="'reds' is offered by both"):
        train.main(_multi_args(photo_dir, tmp_path, "multi", "--iterations", "3"))
    assert not (tmp_path / "runs" / "multi").exists()
    assert read_manifest(tmp_path / "zoo").names() == ["reds"]


def test_add_style_trains_only_the_new_slot(photo_dir: Path, tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    run(_multi_args(photo_dir, tmp_path, "multi", "--iterations", "2"))
    before, base = load_model("multi", root=zoo)
    greens = tmp_path / "styles" / "greens.png"
    Image.fromarray(np.full((40, 40, 3), (30, 220, 40), np.uint8)).save(greens)
    argv = _multi_args(photo_dir, tmp_path, "multi", "--iterations", "3")
    argv[argv.index("--style-images") + 1 : argv.index("--style-images") + 3] = [str(greens)]
    argv[0] = "add-style"
    # The architecture is the base net's: add-style takes no architecture options.
    at = argv.index("--channels")
    del argv[at : at + 6]  # --channels 8 8 8 --num-residual 1
    run([*argv, "--base", "multi", "--lr", "0.05"])
    after, entry = load_model("multi", root=zoo)
    assert [s.name for s in entry.styles] == ["identity", "reds", "blues", "greens"]
    assert entry.arch.num_styles == 4  # type: ignore[union-attr]
    old, new = before.state_dict(), after.state_dict()
    changed_rows = False
    for key, value in old.items():
        if value.ndim and value.shape != new[key].shape:  # a conditional table: S x C
            torch.testing.assert_close(new[key][:3], value, msg=key)  # old styles untouched
            changed_rows |= bool((new[key][3] - value[1:].mean(0)).abs().max() > 1e-6)
        else:
            torch.testing.assert_close(new[key], value, msg=key)  # every conv untouched
    assert changed_rows, "the new style's scale and shift did not train"
    assert entry.training["lineage"][-1]["sha256"] == base.sha256
    assert tuple(entry.training["channels"]) == (8, 8, 8) and entry.training["identity"]
    assert entry.training["total_iterations"] == 2 + 3


def test_add_style_with_a_style_the_net_has_retrains_only_that_row(
    photo_dir: Path, tmp_path: Path
) -> None:
    """How the shipped candy slot was retuned: add-style given a style already in the net,
    with the same image, trains that slot's scale and shift and nothing else."""
    zoo = tmp_path / "zoo"
    run(_multi_args(photo_dir, tmp_path, "multi", "--iterations", "2"))
    before, base = load_model("multi", root=zoo)
    argv = _multi_args(photo_dir, tmp_path, "multi", "--iterations", "3")
    at = argv.index("--style-images")
    del argv[at + 1]  # reds: only blues (row 2) is named
    argv[0] = "add-style"
    at = argv.index("--channels")
    del argv[at : at + 6]
    run([*argv, "--base", "multi", "--lr", "0.05"])
    after, entry = load_model("multi", root=zoo)
    assert [s.name for s in entry.styles] == ["identity", "reds", "blues"]
    old, new = before.state_dict(), after.state_dict()
    tables = 0
    for key, value in old.items():
        assert new[key].shape == value.shape, key  # no row added
        if value.ndim == 2 and value.shape[0] == 3:  # a conditional table: S x C
            tables += 1
            torch.testing.assert_close(new[key][:2], value[:2], msg=key)  # identity, reds
            assert (new[key][2] - value[2]).abs().max() > 1e-6, key  # blues trained
        else:
            torch.testing.assert_close(new[key], value, msg=key)  # every conv untouched
    assert tables > 0
    assert entry.training["lineage"][-1]["sha256"] == base.sha256


def test_a_resumed_run_may_regroup_its_parameters(tmp_path: Path) -> None:
    """Adam's state is stored by parameter name: a run resumed with another learning rate for
    some parameters (a second group) continues each parameter's moments, also from a
    checkpoint of the older index-keyed format."""
    from safetensors.torch import load_file, save_file

    from training.checkpoint import RunState, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    one = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(5, 3)).sum().backward()
    one.step()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, net, one, RunState(iteration=1), 1.0)
    saved = load_file(str(path))
    assert "optim.1.weight.exp_avg" in saved  # by name: layer 1's weight
    first, second = list(net[0].parameters()), list(net[1].parameters())
    two = torch.optim.Adam([{"params": second, "lr": 1e-2}, {"params": first}], lr=1e-3)
    assert load_checkpoint(path, net, two).iteration == 1
    for p in net.parameters():
        torch.testing.assert_close(two.state[p]["exp_avg"], one.state[p]["exp_avg"])
    # the older format: "optim.<index>.<key>", the index into net.parameters()
    old = {k: v for k, v in saved.items() if not k.startswith("optim.")}
    for index, p in enumerate(net.parameters()):
        for key, value in one.state[p].items():
            old[f"optim.{index}.{key}"] = torch.as_tensor(value)
    save_file(old, str(path))
    three = torch.optim.Adam([{"params": second}, {"params": first}], lr=1e-3)
    load_checkpoint(path, net, three)
    for p in net.parameters():
        torch.testing.assert_close(three.state[p]["exp_avg_sq"], one.state[p]["exp_avg_sq"])


def test_adam_moments_resume_in_their_parameters_layout(tmp_path: Path) -> None:
    """The trainer's conv weights are channels_last; a checkpoint loads contiguous. CUDA's
    fused Adam refuses moments whose strides differ from their parameter's (the 2026-12-04
    lease's resume failed so), so the loaded moments take each parameter's layout."""
    from training.checkpoint import RunState, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
    net = net.to(memory_format=torch.channels_last)
    one = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(2, 3, 9, 9)).sum().backward()
    one.step()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, net, one, RunState(iteration=1), 1.0)
    two = torch.optim.Adam(net.parameters(), lr=1e-3)
    load_checkpoint(path, net, two)
    weight = net[0].weight
    assert not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    for p in net.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            moment = two.state[p][key]
            assert moment.stride() == p.stride(), key
            torch.testing.assert_close(moment, one.state[p][key])


def test_strength_uses_the_identity_slot_only_if_it_gives_the_photo_back(tmp_path: Path) -> None:
    from tests.conftest import add_tiny_multistyle, make_tiny_zoo

    zoo = make_tiny_zoo(tmp_path / "zoo")
    add_tiny_multistyle(zoo)
    manifest = read_manifest(zoo)
    entry = next(m for m in manifest.models if m.identity_index is not None)
    style = next(s.name for s in entry.styles if s.role == "style" and s.public)
    # Unmeasured (an older manifest): the identity slot is trusted.
    assert resolve_style(manifest, style, None).identity == entry.identity_index
    for psnr, uses_slot in ((IDENTITY_MIN_PSNR_DB + 1, True), (IDENTITY_MIN_PSNR_DB - 1, False)):
        slot = next(s for s in entry.styles if s.role == "identity")
        slot.metrics["fidelity"] = {"psnr_db": psnr}
        choice = resolve_style(Manifest.model_validate(manifest.model_dump()), style, None)
        assert (choice.identity is not None) is uses_slot
        assert choice.pixel_blend(0.5) is not uses_slot


def test_promotion_copies_a_run_into_the_zoo_retiring_what_it_replaces(
    photo_dir: Path, tmp_path: Path
) -> None:
    from tests.conftest import make_tiny_zoo
    from training.promote import main as promote

    run(_multi_args(photo_dir, tmp_path, "multi", "--iterations", "1"))
    shipped = make_tiny_zoo(tmp_path / "shipped")
    argv = ["--from", str(tmp_path / "zoo"), "--model", "multi", "--to", str(shipped)]
    assert promote([*argv, "--retire", "nope"]) == 2
    assert promote([*argv, "--retire", "tiny_style"]) == 2  # no description: refused
    assert "tiny_style" in read_manifest(shipped).names()  # and nothing changed
    argv += ["--description", "three styles, one net"]
    assert promote([*argv, "--private", "blues", "--retire", "tiny_style"]) == 0
    manifest = read_manifest(shipped)
    assert manifest.get("multi").description == "three styles, one net"
    assert "tiny_style" not in manifest.names() and "multi" in manifest.names()
    assert not (shipped / "weights" / "tiny_style.safetensors").exists()
    assert set(manifest.styles()) == {"mosaic", "reds"}  # blues is private
    entry = manifest.get("multi")
    assert entry.sha256 == sha256_file(shipped / entry.weights)
    assert entry.iterations == 1 and entry.training["lineage"] == []
    # Stored in fp16 as the zoo is, within the storage gate of the run's own fp32 weights.
    storage = entry.metrics["storage"]
    assert storage["dtype"] == "fp16" and storage["psnr_db_vs_fp32"] >= 40
    assert storage["fp32_sha256"] == read_manifest(tmp_path / "zoo").get("multi").sha256
    with safe_open(str(shipped / entry.weights), "pt") as stored:
        assert {stored.get_slice(k).get_dtype() for k in stored.keys()} == {"F16"}  # noqa: SIM118
    net, _ = load_model("multi", root=shipped)
    assert net(torch.rand(1, 3, 16, 16), net.one_hot(2)).shape == (1, 3, 16, 16)
    # The identity slot's fidelity is measured on the way and decides how strength works: this
    # one-iteration net does not give the photo back, so strength blends pixels instead.
    fidelity = entry.styles[0].metrics["fidelity"]
    assert entry.styles[0].role == "identity" and fidelity["psnr_db"] < IDENTITY_MIN_PSNR_DB
    assert fidelity["strength"] == "pixel blend"
    choice = resolve_style(manifest, "reds", None)
    assert choice.identity is None and choice.pixel_blend(0.5)


def _distill_args(photo_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "distill", "--teacher", "multi", "--teacher-zoo", str(tmp_path / "zoo"),
        "--name", "multi", "--zoo", str(tmp_path / "student-zoo"), "--data", str(photo_dir),
        "--channels", "4", "8", "8", "--num-residual", "1", "--outer-kernel", "3",
        "--decoder-channels", "8", "4", "--image-size", "32", "--batch-size", "3",
        "--run-dir", str(tmp_path / "student-runs"), "--quiet", *extra,
    ]  # fmt: skip


def test_a_distilled_student_gets_the_teachers_slots_and_learns_its_outputs(
    photo_dir: Path, tmp_path: Path
) -> None:
    """The cheap-net path: ``distill`` trains a narrower net (its own architecture, the
    teacher's slots) on the teacher's outputs; the pixel error to the teacher falls, and the
    entry records the teacher as the parent of its lineage."""
    run(_multi_args(photo_dir, tmp_path, "multi", "--iterations", "2"))
    teacher, teacher_entry = load_model("multi", root=tmp_path / "zoo")
    run(_distill_args(photo_dir, tmp_path, "--iterations", "60", "--lr", "0.02"))
    student, entry = load_model("multi", root=tmp_path / "student-zoo")
    assert entry.arch.decoder_channels == (8, 4)  # type: ignore[union-attr]
    assert entry.arch.channels == (4, 8, 8) and entry.loss == "distilled"  # type: ignore[union-attr]
    assert [(s.name, s.index, s.role) for s in entry.styles] == [
        (s.name, s.index, s.role) for s in teacher_entry.styles
    ]
    assert entry.training["teacher"] == "multi" and "teacher_zoo" not in entry.training
    assert entry.training["lineage"][-1]["sha256"] == teacher_entry.sha256
    history = json.loads((tmp_path / "student-runs" / "multi" / "checkpoint.json").read_text())
    pixel = [h["pixel"] for h in history["history"]]
    assert np.mean(pixel[-10:]) < 0.8 * np.mean(pixel[:10])
    # Style slots learn the teacher's output, the identity slot the photo itself.
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        to_teacher = (student(x, student.one_hot(1)) - teacher(x, teacher.one_hot(1))).abs()
        to_photo = (student(x, student.one_hot(0)) - x).abs()
    assert float(to_teacher.mean()) < 0.2 and float(to_photo.mean()) < 0.3


def test_distillation_targets_are_the_teachers_output_and_the_photo(
    photo_dir: Path, tmp_path: Path
) -> None:
    """The loss is zero for a student that *is* the teacher on its style slots, and for one
    that returns the photo on the identity slot, and not otherwise."""
    from training.cli import build_parser, settings_from_args
    from training.tasks.distill import DistillTask

    run(_multi_args(photo_dir, tmp_path, "multi", "--iterations", "1"))
    argv = _distill_args(photo_dir, tmp_path, "--iterations", "1")
    task = DistillTask(settings_from_args(build_parser().parse_args(argv)))  # type: ignore[arg-type]
    task.prepare(None, torch.device("cpu"))
    teacher = task.teacher
    batch = torch.rand(3, 3, 32, 32)

    def loss_with(net: torch.nn.Module, slots: list[int]) -> float:
        task._cycle = list(slots)
        return task.loss(net, batch)[1]["pixel"]

    class Photo(torch.nn.Module):
        def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            return x

    assert loss_with(teacher, [1, 2, 1]) == 0.0
    assert loss_with(Photo(), [0, 0, 0]) == 0.0
    assert loss_with(Photo(), [1, 2, 1]) > 0.01
    assert loss_with(teacher, [0, 0, 0]) > 1e-3  # the 1-iteration teacher's identity is poor

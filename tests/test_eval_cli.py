"""``python -m evaluation`` end to end on generated images and a temp zoo of tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import cli as zoo_eval
from evaluation.metrics import modcrop, sr_scores
from evaluation.sr import evaluate_sr, make_lr
from evaluation.style import evaluate_style, square_photo
from model_zoo.config import StyleNetConfig
from model_zoo.manifest import read_manifest
from model_zoo.nets import build_net
from model_zoo.registry import load_model, save_model
from tests.conftest import add_tiny_pixel_sr


def write_photo(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    chans = [
        128
        + 80 * np.sin(xx / (4.0 + c) + seed) * np.cos(yy / (6.0 - c))
        + rng.normal(0, 6, xx.shape)
        for c in range(3)
    ]
    Image.fromarray(np.clip(np.stack(chans, 2), 0, 255).astype(np.uint8)).save(path)


@pytest.fixture()
def bench(tmp_path: Path) -> Path:
    """Two sets of odd-sized photos (modcrop has work to do), one grayscale image among them."""
    data = tmp_path / "bench"
    for set_name, sizes in {"SetA": [(67, 61), (70, 58)], "SetB": [(64, 72)]}.items():
        (data / set_name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            write_photo(data / set_name / f"img{i}.png", w, h, seed=i + len(set_name))
    Image.open(data / "SetB" / "img0.png").convert("L").save(data / "SetB" / "gray.png")
    return data


@pytest.fixture()
def sr_zoo(tiny_zoo: Path) -> Path:
    add_tiny_pixel_sr(tiny_zoo, seed=1)
    return tiny_zoo


def test_sr_eval_writes_table_json_and_manifest_metrics(
    sr_zoo: Path, bench: Path, tmp_path: Path
) -> None:
    out, js = tmp_path / "sr.md", tmp_path / "sr.json"
    rc = zoo_eval.main(
        [
            "sr",
            "--models",
            "x4",
            "x4_pixel",
            "x8",
            "--sets",
            "SetA",
            "SetB",
            "--data",
            str(bench),
            "--zoo",
            str(sr_zoo),
            "--out",
            str(out),
            "--json",
            str(js),
            "--lpips-without-grid",
        ]
    )
    assert rc == 0
    rows = json.loads(js.read_text())
    # 4 images x (x4: bicubic, x4, x4_pixel; x8: bicubic, x8) = 20 rows
    assert len(rows) == 20
    assert {(r["factor"], r["method"]) for r in rows} == {
        (4, "bicubic"),
        (4, "x4"),
        (4, "x4_pixel"),
        (8, "bicubic"),
        (8, "x8"),
    }
    for r in rows:
        assert math.isfinite(r["psnr"]) and 0 < r["psnr"] < 100
        assert -1 <= r["ssim"] <= 1 and r["lpips"] > 0 and r["grid"] >= 0
        assert r["lpips_without_grid"] > 0

    manifest = read_manifest(sr_zoo)
    sr = manifest.get("x4").metrics["sr"]
    seta = [r for r in rows if r["set"] == "SetA" and r["factor"] == 4]
    for method, key in (("x4", None), ("bicubic", "bicubic")):
        stored = sr["sets"]["SetA"] if key is None else sr["sets"]["SetA"][key]
        mine = [r for r in seta if r["method"] == method]
        assert stored["images"] == 2
        assert stored["psnr"] == pytest.approx(np.mean([r["psnr"] for r in mine]))
        assert stored["lpips"] == pytest.approx(np.mean([r["lpips"] for r in mine]))
        assert stored["grid"] == pytest.approx(np.mean([r["grid"] for r in mine]))
    assert sr["protocol"]["y"] == "BT.601"
    assert "SetB" in manifest.get("x8").metrics["sr"]["sets"]
    assert "sr" not in manifest.get("tiny_style").metrics
    # Each factor's default is the lower mean LPIPS of what was just stored.
    mean = {
        name: np.mean([s["lpips"] for s in manifest.get(name).metrics["sr"]["sets"].values()])
        for name in ("x4", "x4_pixel")
    }
    assert manifest.default_upscalers == {4: min(mean, key=mean.__getitem__), 8: "x8"}

    table = out.read_text()
    assert "### x4" in table and "### x8" in table
    assert "SetA (2)" in table and "paper l_feat" in table and "LPIPS / grid" in table
    assert "with each output's LR-grid pattern removed" in table


def test_sr_scores_use_the_training_degradation(sr_zoo: Path, bench: Path) -> None:
    """The bicubic row equals a recomputation through data.degrade + uint8 + PIL bicubic."""
    from evaluation.metrics import bicubic_upscale
    from model_zoo.imaging import load_rgb, to_image, to_tensor
    from training.data import degrade

    rows = evaluate_sr(["x4"], ["SetA"], bench, root=str(sr_zoo), limit=1)
    hr = modcrop(load_rgb(bench / "SetA" / "img0.png"), 4)
    lr = to_image(degrade(to_tensor(hr), 4))
    expected = sr_scores(bicubic_upscale(lr, 4), hr, 4)
    bicubic = next(r for r in rows if r.method == "bicubic")
    assert bicubic.psnr == pytest.approx(expected["psnr"])
    assert bicubic.ssim == pytest.approx(expected["ssim"])
    net, _ = load_model("x4", root=sr_zoo)
    model_row = next(r for r in rows if r.method == "x4")
    with torch.inference_mode():
        out = to_image(net(to_tensor(lr)).clamp(0, 1))
    assert model_row.psnr == pytest.approx(sr_scores(out, hr, 4)["psnr"])


def test_sr_eval_rejects_unknown_or_wrong_kind_models(
    sr_zoo: Path, bench: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--sets", "SetA", "--data", str(bench), "--zoo", str(sr_zoo), "--out", "-"]
    assert zoo_eval.main(["sr", "--models", "nope", *base]) == 2
    assert "no model named 'nope'" in capsys.readouterr().err
    assert zoo_eval.main(["sr", "--models", "tiny_style", *base]) == 2
    assert "needs sr models" in capsys.readouterr().err
    assert zoo_eval.main(["sr", "--models", "x4", "--sets", "Missing", *base[2:]]) == 2


@pytest.fixture()
def style_zoo(tiny_zoo: Path, tmp_path: Path) -> Path:
    """The tiny style model re-saved with a training record, as the trainer writes one."""
    style = tmp_path / "style.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(style)
    config = StyleNetConfig(base_channels=8, num_residual=1)
    torch.manual_seed(2)
    save_model(
        build_net(config),
        name="tiny_style",
        kind="style",
        arch=config,
        root=tiny_zoo,
        training={
            "style_image": str(style),
            "style_size": 40,
            "content_weight": 1e5,
            "style_weight": 1e10,
            "tv_weight": 1e-6,
            "precision": "bf16",
        },
    )
    return tiny_zoo


def test_style_eval_compares_with_lbfgs_and_stores_metrics(
    style_zoo: Path, bench: Path, tmp_path: Path
) -> None:
    out, js = tmp_path / "style.md", tmp_path / "style.json"
    rc = zoo_eval.main(
        [
            "style",
            "--models",
            "tiny_style",
            "--photos",
            str(bench / "SetA"),
            "--num-photos",
            "2",
            "--sizes",
            "32",
            "--iterations",
            "2",
            "4",
            "--ff-repeats",
            "1",
            "--init",
            "content",
            "--zoo",
            str(style_zoo),
            "--out",
            str(out),
            "--json",
            str(js),
        ]
    )
    assert rc == 0
    metrics = read_manifest(style_zoo).get("tiny_style").metrics["style_vs_optimization"]
    block = metrics["sizes"]["32"]
    assert metrics["protocol"]["init"] == "content"
    assert block["summary"]["photos"] == 2 and len(block["per_photo"]) == 2
    for photo in block["per_photo"]:
        assert set(photo["baseline_objective"]) == {"2", "4"}
        assert photo["ff_objective"] > 0 and photo["ff_time_s"] > 0
        times = photo["baseline_time_s"]
        assert 0 < times["2"] <= times["4"]
        k = photo["match_iteration"]
        if k is None:
            assert photo["time_ratio"] is None
        else:
            assert 0 <= k <= 4
            assert photo["time_ratio"] == pytest.approx(photo["match_time_s"] / photo["ff_time_s"])
    summary = block["summary"]
    assert summary["ff_objective"] == pytest.approx(
        np.mean([p["ff_objective"] for p in block["per_photo"]])
    )
    table = out.read_text()
    assert "| tiny_style | 32 | 2 |" in table and "L-BFGS 4 its" in table
    one_photo = [
        "style", "--models", "tiny_style", "--photos", str(bench / "SetA"),
        "--num-photos", "1", "--iterations", "2", "--ff-repeats", "1",
        "--zoo", str(style_zoo), "--out", "-",
    ]  # fmt: skip
    # A later run at another size adds to the stored results instead of replacing them.
    assert zoo_eval.main([*one_photo, "--sizes", "24"]) == 0
    merged = read_manifest(style_zoo).get("tiny_style").metrics["style_vs_optimization"]
    assert set(merged["sizes"]) == {"32", "24"}
    assert merged["sizes"]["32"]["summary"] == summary
    assert merged["sizes"]["32"]["protocol"]["init"] == "content"
    assert merged["sizes"]["24"]["protocol"]["init"] == "noise"
    # A run on fewer photos at a size measured on more keeps the fuller numbers.
    assert zoo_eval.main([*one_photo, "--sizes", "32"]) == 0
    again = read_manifest(style_zoo).get("tiny_style").metrics["style_vs_optimization"]
    assert again["sizes"]["32"]["summary"] == summary


def test_style_objective_of_the_feed_forward_output_is_the_gatys_objective(
    style_zoo: Path, bench: Path
) -> None:
    """The feed-forward score is the same function the baseline minimises, on the same image."""
    from evaluation.gatys import objective_for, settings_from_entry
    from model_zoo.imaging import load_rgb, to_tensor
    from model_zoo.reference import run_model
    from training.vgg import VGG16Features

    vgg = VGG16Features()
    results = evaluate_style(
        ["tiny_style"],
        bench / "SetB",
        [32],
        root=str(style_zoo),
        num_photos=1,
        checkpoints=[1],
        init="noise",
        ff_repeats=1,
        vgg=vgg,
    )
    photo = results["tiny_style"]["32"]["per_photo"][0]
    net, entry = load_model("tiny_style", root=style_zoo)
    content = to_tensor(square_photo(load_rgb(bench / "SetB" / photo["photo"]), 32))
    objective = objective_for(settings_from_entry(entry), content, vgg)
    assert photo["ff_objective"] == pytest.approx(
        objective.value(run_model(net, content)), rel=1e-5
    )


def test_style_eval_needs_a_training_record(tiny_zoo: Path, bench: Path) -> None:
    rc = zoo_eval.main(
        [
            "style",
            "--models",
            "mosaic",
            "--photos",
            str(bench / "SetA"),
            "--sizes",
            "32",
            "--iterations",
            "1",
            "--zoo",
            str(tiny_zoo),
            "--out",
            "-",
        ]
    )
    assert rc == 2


def test_plain_bicubic_protocol_is_stored_beside_the_main_numbers(
    sr_zoo: Path, bench: Path, tmp_path: Path
) -> None:
    base = ["--models", "x4", "--sets", "SetA", "--data", str(bench), "--zoo", str(sr_zoo)]
    assert zoo_eval.main(["sr", *base, "--out", "-"]) == 0
    assert zoo_eval.main(["sr", *base, "--degradation", "bicubic", "--out", "-"]) == 0
    metrics = read_manifest(sr_zoo).get("x4").metrics
    main, side = metrics["sr"]["sets"]["SetA"], metrics["sr_bicubic_lr"]["sets"]["SetA"]
    # Without the blur, more detail survives in the LR image: bicubic recovers more.
    assert side["bicubic"]["psnr"] > main["bicubic"]["psnr"]
    assert metrics["sr_bicubic_lr"]["protocol"]["lr"].startswith("bicubic")
    hr = modcrop(Image.open(bench / "SetA" / "img0.png").convert("RGB"), 4)
    assert make_lr(hr, 4, "bicubic").size == (hr.width // 4, hr.height // 4)


def test_sr_results_merge_by_set_and_a_partial_run_keeps_the_full_numbers(
    sr_zoo: Path, bench: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["sr", "--models", "x4", "--data", str(bench), "--zoo", str(sr_zoo), "--out", "-"]
    assert zoo_eval.main([*base, "--sets", "SetA", "SetB"]) == 0
    full = read_manifest(sr_zoo).get("x4").metrics["sr"]["sets"]
    assert full["SetA"]["images"] == full["SetB"]["images"] == 2

    capsys.readouterr()
    assert zoo_eval.main([*base, "--sets", "SetA", "--limit", "1"]) == 0
    assert "x4/SetA: stored numbers kept" in capsys.readouterr().err
    sr = read_manifest(sr_zoo).get("x4").metrics["sr"]
    assert sr["sets"]["SetA"] == full["SetA"]  # the two-image numbers, not the one-image ones
    assert sr["sets"]["SetB"] == full["SetB"]  # a run over SetA does not erase SetB
    assert sr["protocol"]["limit"] == 1  # the latest run's protocol says it was partial
    assert "limit" not in sr["sets"]["SetA"]["protocol"]

    # A full run over one set replaces that set only, under its own protocol.
    assert zoo_eval.main([*base, "--sets", "SetB", "--precision", "bf16"]) == 0
    sr = read_manifest(sr_zoo).get("x4").metrics["sr"]
    assert sr["sets"]["SetB"]["protocol"]["precision"] == "bf16"
    assert sr["sets"]["SetA"]["protocol"]["precision"] == "fp32"
    assert sr["sets"]["SetB"]["psnr"] == pytest.approx(full["SetB"]["psnr"], abs=0.5)


def test_droplet_eval_counts_per_style_and_slot_and_stores_them(
    tiny_zoo: Path, bench: Path, tmp_path: Path
) -> None:
    from tests.conftest import add_tiny_multistyle

    add_tiny_multistyle(tiny_zoo)
    out, examples = tmp_path / "droplets.md", tmp_path / "examples"
    argv = ["droplets", "--zoo", str(tiny_zoo), "--photos", str(bench / "SetA")]
    argv += ["--models", "mosaic", "tiny_multi", "--sizes", "48", "96", "--out", str(out)]
    assert (
        zoo_eval.main([*argv, "--examples", str(examples), "--json", str(tmp_path / "d.json")]) == 0
    )
    table = out.read_text()
    for style in ("mosaic", "ms_a", "ms_b"):  # a multi-style model stands for its styles
        assert f"| {style} |" in table
    assert "identity" not in table
    results = json.loads((tmp_path / "d.json").read_text())
    assert results["ms_b"]["96"]["photos"] == 2
    manifest = read_manifest(tiny_zoo)
    assert manifest.get("mosaic").metrics["droplets"]["sizes"]["48"]["photos"] == 2
    slot = next(s for s in manifest.get("tiny_multi").styles if s.name == "ms_a")
    counts = slot.metrics["droplets"]["sizes"]
    assert set(counts) == {"48", "96"} and counts["96"]["protocol"]["precision"] == "fp32"
    assert counts["96"]["droplets"] == results["ms_a"]["96"]["droplets"]
    # One photo at 96 px keeps the two-photo numbers; a new size is added beside them.
    argv1 = ["droplets", "--zoo", str(tiny_zoo), "--photos", str(bench / "SetA"), "--out", "-"]
    assert (
        zoo_eval.main([*argv1, "--models", "mosaic", "--num-photos", "1", "--sizes", "96", "64"])
        == 0
    )
    sizes = read_manifest(tiny_zoo).get("mosaic").metrics["droplets"]["sizes"]
    assert sizes["96"]["photos"] == 2 and sizes["64"]["photos"] == 1

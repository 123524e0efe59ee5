"""The worker's inference engine on real (tiny, untrained) zoo models: batching, precision,
tiling, alpha, encoding. No Redis here; tests/test_worker_queue.py runs the worker process.

Tests of padded mixed-size batching pin ``cpu_runtime="torch"``: with OpenVINO as the CPU runtime
(the default where it is installed) style nets batch equal sizes only (tested at the end)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobqueue.protocol import StyleControls
from model_zoo.config import StyleNetConfig
from model_zoo.nets import build_net
from model_zoo.reference import apply_to_image
from model_zoo.registry import load_model, save_model
from worker import openvino_runtime
from worker.batching import BatchWindow, fill, pack
from worker.encoding import EncodeOptions, encode
from worker.engine import (
    MAX_FULL_PRECISION_HEAD,
    MIN_REDUCED_SPEEDUP,
    Engine,
    resolve_batch_pixels,
)
from worker.ragged import pad_to_stride
from worker.settings import CPU_AUTO_BATCH_PIXELS, CUDA_AUTO_BATCH_PIXELS, WorkerSettings
from worker.tiling import TileAccumulator, plan_tiles

from .conftest import add_tiny_multistyle


def image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A photo-like test image: smooth gradients and blobs plus mild noise (pure noise is an
    unrealistic worst case for reduced precision and compresses like nothing else)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack(
        [np.sin(6 * x + seed) * 0.5 + 0.5, y, np.cos(9 * x * y + seed) * 0.5 + 0.5], axis=-1
    )
    pixels = base * 200 + rng.normal(0, 12, (height, width, 3)) + 20
    if channels == 4:
        alpha = (x * 255 + rng.integers(0, 40, (height, width)))[..., None]
        pixels = np.concatenate([pixels, alpha], axis=-1)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def reference(zoo: Path, name: str, pixels: np.ndarray) -> np.ndarray:
    """What ``model_zoo.reference`` (fp32, untiled, unbatched) makes of ``pixels``."""
    net, _ = load_model(name, root=zoo)
    return np.asarray(apply_to_image(net, Image.fromarray(pixels[..., :3])))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def uint8_image(batch: torch.Tensor) -> np.ndarray:
    """The first image of an N x 3 x H x W batch in [0, 1] as H x W x 3 uint8."""
    return (batch[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


MIXED = [(40, 48), (40, 48), (37, 50), (33, 46), (64, 64), (21, 30), (60, 57)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batch_equivalence_holds_for_the_full_size_style_net(
    tiny_zoo: Path, precision: str
) -> None:
    """The real architecture has 15 InstanceNorm layers that amplify 1-ulp differences. In fp32
    padded and alone agree to a level. In bf16 they agree within the precision gate only:
    oneDNN picks its kernels (and so its rounding) by tensor shape, and a canvas is another
    shape than the image alone (measured: up to 3 levels on an AMX CPU)."""
    torch.manual_seed(1)
    save_model(
        build_net(StyleNetConfig()),
        name="full_style",
        kind="style",
        arch=StyleNetConfig(),
        root=tiny_zoo,
    )
    engine = Engine(zoo_dir=tiny_zoo, cpu_runtime="torch", precision=precision, min_psnr_db=0)
    assert engine.model("full_style").exact_padding
    assert engine.model("full_style").precision == precision

    def agree(a: np.ndarray, b: np.ndarray) -> None:
        if precision == "fp32":
            assert max_diff(a, b) <= 1
        else:
            assert psnr(a, b) >= 40

    requests = [("full_style", image(h, w, seed=h)) for h, w in [(48, 48), (45, 39), (32, 52)]]
    together = engine.run(requests)
    assert [o.batch_size for o in together] == [3, 3, 3]
    for request, out in zip(requests, together, strict=True):
        (alone,) = engine.run([request])
        agree(out.pixels, alone.pixels)
    # A uniform batch (every sample full-size) must agree with each image alone as well.
    uniform = [("full_style", image(40, 44, seed=seed)) for seed in range(3)]
    together = engine.run(uniform)
    assert [o.batch_size for o in together] == [3, 3, 3]
    for request, out in zip(uniform, together, strict=True):
        (alone,) = engine.run([request])
        agree(out.pixels, alone.pixels)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["tiny_style", "x4", "x8"])
def test_batch_gives_each_job_the_pixels_it_gets_alone(
    tiny_zoo: Path, name: str, precision: str
) -> None:
    # Exactness is the point here, so a budget that lets the x4 outputs share passes (the CPU
    # default of one 256² image per pass would split them).
    engine = Engine(
        zoo_dir=tiny_zoo,
        cpu_runtime="torch",
        precision=precision,
        max_batch=8,
        max_batch_pixels=1 << 22,
    )
    requests = [(name, image(h, w, seed=i)) for i, (h, w) in enumerate(MIXED)]
    together = engine.run(requests)
    for (model, pixels), out in zip(requests, together, strict=True):
        (alone,) = engine.run([(model, pixels)])
        assert alone.batch_size == 1
        assert max_diff(out.pixels, alone.pixels) <= 1
        if precision == "fp32":  # and both are what the plain reference path gives
            assert max_diff(out.pixels, reference(tiny_zoo, name, pixels)) <= 1
    # Mixed sizes share forward passes instead of collapsing to batch size 1.
    assert max(o.batch_size for o in together) >= 3
    assert together[0].batch_size >= 2  # the equal-size pair at least


def test_padded_batch_is_exact_across_very_different_sizes(tiny_zoo: Path) -> None:
    """Allowing any amount of filler stresses the per-sample padding and normalisation."""
    engine = Engine(zoo_dir=tiny_zoo, cpu_runtime="torch", precision="fp32", max_pad_fraction=0.99)
    requests = [("tiny_style", image(h, w, seed=h)) for h, w in [(64, 64), (13, 9), (30, 61)]]
    together = engine.run(requests)
    assert all(o.batch_size == 3 for o in together)
    for (name, pixels), out in zip(requests, together, strict=True):
        assert max_diff(out.pixels, reference(tiny_zoo, name, pixels)) <= 1


@pytest.mark.parametrize("name", ["tiny_style", "x4", "x8"])
def test_reduced_precision_keeps_psnr_above_40db(tiny_zoo: Path, name: str) -> None:
    expected = "bf16" if torch.cpu._is_avx512_bf16_supported() else "fp32"
    assert Engine(zoo_dir=tiny_zoo, precision="auto").precision == expected
    # min_psnr_db=0 and the precision named: the raw reduced-precision path, not the
    # calibration's fallback or the speed probe's choice.
    engine = Engine(zoo_dir=tiny_zoo, precision=expected, min_psnr_db=0.0)
    for seed, (h, w) in enumerate([(64, 64), (48, 36)]):
        pixels = image(h, w, seed=seed)
        (out,) = engine.run([(name, pixels)])
        ref = reference(tiny_zoo, name, pixels)
        assert psnr(out.pixels, ref) >= 40.0
    if expected == "bf16" and name == "tiny_style":
        assert max_diff(out.pixels, ref) > 0  # the reduced-precision path really ran


@pytest.mark.parametrize("name", ["tiny_style", "x4"])
def test_models_that_lose_quality_in_reduced_precision_are_served_in_fp32(
    tiny_zoo: Path, name: str
) -> None:
    pixels = image(40, 44, seed=3)
    ref = reference(tiny_zoo, name, pixels)
    # An impossible bar: calibration must refuse bf16 and the output must be exactly fp32's.
    strict = Engine(zoo_dir=tiny_zoo, precision="bf16", min_psnr_db=200.0)
    (out,) = strict.run([(name, pixels)])
    # On a CPU without bf16 kernels OpenVINO runs f32 whatever it is asked: no bf16 to refuse.
    no_bf16 = strict.model(name).executor is not None and not openvino_runtime.runs_bf16()
    assert strict.model(name).precision == "fp32"
    if not no_bf16:
        assert strict.model(name).calibration_psnr_db < 200.0
    assert max_diff(out.pixels, ref) == 0
    # No bar: the reduced precision is kept where it exists.
    lax = Engine(zoo_dir=tiny_zoo, precision="bf16", min_psnr_db=0.0)
    assert lax.model(name).precision == ("fp32" if no_bf16 else "bf16")


def test_a_bf16_request_openvino_cannot_run_is_served_and_reported_as_fp32(
    tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an AVX2-only CPU OpenVINO ignores a bf16 hint and runs f32; the worker once
    reported such a model as bf16. The capability query stands in for that CPU here."""
    monkeypatch.setattr(openvino_runtime, "runs_bf16", lambda: False)
    engine = Engine(zoo_dir=tiny_zoo, precision="bf16", cpu_runtime="openvino")
    model = engine.model("tiny_style")
    assert model.runtime == "openvino" and model.precision == "fp32"
    assert model.precision_timings_ms == {}  # nothing to choose between
    pixels = image(48, 48, seed=5)
    (out,) = engine.run([("tiny_style", pixels)])
    assert psnr(out.pixels, reference(tiny_zoo, "tiny_style", pixels)) >= 40


@pytest.mark.parametrize("name", ["tiny_style", "x4"])
def test_cpu_auto_precision_serves_the_faster_of_the_precisions_that_pass(
    tiny_zoo: Path, name: str
) -> None:
    auto = Engine(zoo_dir=tiny_zoo, precision="auto", min_psnr_db=0.0)
    model = auto.model(name)
    if auto.precision == "fp32":  # no native bf16: nothing to choose, nothing timed
        assert model.precision == "fp32" and model.precision_timings_ms == {}
        return
    timings = model.precision_timings_ms
    assert set(timings) == {"bf16", "fp32"} and all(t > 0 for t in timings.values())
    faster = "bf16" if timings["fp32"] >= MIN_REDUCED_SPEEDUP * timings["bf16"] else "fp32"
    assert model.precision == faster
    # A precision the operator names is quality-gated only: no probe, no speed choice.
    named = Engine(zoo_dir=tiny_zoo, precision="bf16", min_psnr_db=0.0).model(name)
    assert named.precision == "bf16" and named.precision_timings_ms == {}


def naive_tiles(engine: Engine, name: str, pixels: np.ndarray, tile: int) -> np.ndarray:
    """Tiling without frozen statistics: every tile normalised by its own InstanceNorm."""
    model = engine.model(name)
    padded_h, padded_w = (-(-s // model.stride) * model.stride for s in pixels.shape[:2])
    plan = plan_tiles(padded_h, padded_w, tile=tile, overlap=56, radius=model.radius, stride=4)
    padded = pad_to_stride(torch.from_numpy(pixels).permute(2, 0, 1)[None].float(), 4)
    padded = padded.permute(0, 2, 3, 1)[0].round().to(torch.uint8).numpy()
    accumulator = TileAccumulator(plan, 1)
    for t in plan.tiles:
        (out,) = engine.run([(name, padded[t.top : t.bottom, t.left : t.right])])
        accumulator.add(t, torch.from_numpy(out.pixels).permute(2, 0, 1).float() / 255)
    result = accumulator.image[:, : pixels.shape[0], : pixels.shape[1]]
    return (result.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiled_style_matches_untiled(tiny_zoo: Path, precision: str) -> None:
    """Tiles always run in PyTorch (they borrow frozen statistics), so the whole image is
    compared on PyTorch too; bf16 agrees within the precision gate (kernels differ by shape)."""
    pixels = image(150, 190, seed=3)
    options = {"precision": precision, "cpu_runtime": "torch", "min_psnr_db": 0}
    untiled = Engine(zoo_dir=tiny_zoo, tile_size=4096, **options)
    tiled = Engine(zoo_dir=tiny_zoo, tile_size=96, tile_stats_size=256, **options)
    plan = tiled._tile_plan(tiled.model("tiny_style"), 152, 192)
    assert plan is not None and len(plan.tiles) >= 4
    (whole,) = untiled.run([("tiny_style", pixels)])
    (tiles,) = tiled.run([("tiny_style", pixels)])
    if precision == "fp32":
        assert max_diff(tiles.pixels, whole.pixels) <= 1
    else:
        assert psnr(tiles.pixels, whole.pixels) >= 40
    if precision == "fp32":
        # Per-tile InstanceNorm statistics would visibly shift colours from tile to tile.
        assert max_diff(naive_tiles(untiled, "tiny_style", pixels, 96), whole.pixels) > 8


def test_tiles_with_downscaled_statistics_form_one_seamless_image(tiny_zoo: Path) -> None:
    """Above TILE_STATS_SIZE the statistics come from a downscaled copy: approximate, but the
    same for every tile, so the tiles still form the one image those statistics give."""
    pixels = image(150, 190, seed=4)
    engine = Engine(zoo_dir=tiny_zoo, precision="fp32", tile_size=96, tile_stats_size=96)
    (tiles,) = engine.run([("tiny_style", pixels)])
    model = engine.model("tiny_style")
    padded = pad_to_stride(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, 4)
    request = type("R", (), {"padded": padded, "height": 150, "width": 190, "model": model})
    small = engine._stats_input(request)  # type: ignore[arg-type]
    assert max(small.shape[-2:]) <= 96
    _, stats = engine._forward(model, [small], [None], want_stats=True)
    assert stats is not None
    (whole,), _ = engine._forward(model, [padded], [stats[0]])
    whole_pixels = (whole[:, :150, :190].clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    assert max_diff(tiles.pixels, whole_pixels.numpy()) <= 1
    untiled = Engine(zoo_dir=tiny_zoo, precision="fp32", tile_size=4096)
    (exact,) = untiled.run([("tiny_style", pixels)])
    naive = naive_tiles(untiled, "tiny_style", pixels, 96)
    assert psnr(tiles.pixels, exact.pixels) > psnr(naive, exact.pixels) + 3


@pytest.mark.parametrize("name", ["x4", "x8"])
def test_tiled_sr_matches_untiled(tiny_zoo: Path, name: str) -> None:
    pixels = image(45, 70, seed=5)
    (whole,) = Engine(zoo_dir=tiny_zoo, precision="fp32", tile_size=4096).run([(name, pixels)])
    engine = Engine(zoo_dir=tiny_zoo, precision="fp32", tile_size=160)
    assert engine._tile_plan(engine.model(name), 45, 70) is not None
    (tiles,) = engine.run([(name, pixels)])
    assert max_diff(tiles.pixels, whole.pixels) <= 1


def test_tiles_of_different_images_share_forward_passes(tiny_zoo: Path) -> None:
    engine = Engine(
        zoo_dir=tiny_zoo, cpu_runtime="torch", precision="fp32", tile_size=96, max_batch=8
    )
    requests = [("tiny_style", image(h, w, seed=h)) for h, w in [(150, 190), (130, 100)]]
    together = engine.run(requests)
    assert min(o.batch_size for o in together) == 2
    for request, out in zip(requests, together, strict=True):
        (alone,) = engine.run([request])
        assert max_diff(out.pixels, alone.pixels) <= 1


def test_alpha_is_kept_for_style_and_resized_for_sr(tiny_zoo: Path) -> None:
    engine = Engine(zoo_dir=tiny_zoo, precision="fp32")
    rgba = image(30, 41, channels=4, seed=6)
    style, sr = engine.run([("tiny_style", rgba), ("x4", rgba)])
    assert style.pixels.shape == (30, 41, 4) and sr.pixels.shape == (120, 164, 4)
    np.testing.assert_array_equal(style.pixels[..., 3], rgba[..., 3])
    expected = Image.fromarray(rgba[..., 3]).resize((164, 120), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(sr.pixels[..., 3], np.asarray(expected))
    rgb_style, rgb_sr = engine.run([("tiny_style", rgba[..., :3]), ("x4", rgba[..., :3])])
    np.testing.assert_array_equal(style.pixels[..., :3], rgb_style.pixels)
    np.testing.assert_array_equal(sr.pixels[..., :3], rgb_sr.pixels)


def test_unknown_model_raises_not_found(tiny_zoo: Path) -> None:
    from model_zoo.registry import ModelNotFoundError

    engine = Engine(zoo_dir=tiny_zoo)
    with pytest.raises(ModelNotFoundError):
        engine.run([("no_such_model", image(8, 8))])


@pytest.mark.parametrize("size", [(40, 50), (300, 257)])
@pytest.mark.parametrize("channels", [3, 4])
def test_encoding_round_trips(size: tuple[int, int], channels: int) -> None:
    pixels = image(*size, channels=channels)
    sizes = {}
    for level in (0, 1, 6, 9):
        data, content_type = encode(pixels, "png", EncodeOptions(png_compress_level=level))
        assert content_type == "image/png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
        sizes[level] = len(data)
    assert sizes[1] < sizes[0] and sizes[9] <= sizes[1]
    for fmt, mime in [("jpeg", "image/jpeg"), ("webp", "image/webp")]:
        data, content_type = encode(pixels, fmt)
        decoded = Image.open(io.BytesIO(data))
        assert content_type == mime and decoded.size == (size[1], size[0])
        assert decoded.mode == ("RGB" if fmt == "jpeg" or channels == 3 else "RGBA")
        rgb = np.asarray(decoded.convert("RGB")).astype(int)
        if channels == 3:
            assert psnr(rgb, pixels) > 25  # lossy, but the same picture
    with pytest.raises(ValueError):
        encode(pixels, "gif")


def test_jpeg_composites_transparency_over_white() -> None:
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)  # fully transparent black
    data, _ = encode(pixels, "jpeg")
    assert np.asarray(Image.open(io.BytesIO(data))).min() > 245


def test_pack_bounds_filler_units_and_pixels() -> None:
    sizes = [(64, 64)] * 5 + [(60, 60), (16, 16), (64, 32)]
    groups = pack(sizes, max_units=4, max_pixels=10**9, max_pad_fraction=0.25)
    assert sorted(i for g in groups for i in g.members) == list(range(len(sizes)))
    for g in groups:
        assert len(g.members) <= 4
        canvas = g.height * g.width * len(g.members)
        assert canvas - sum(sizes[i][0] * sizes[i][1] for i in g.members) <= 0.25 * canvas
    assert any(6 in g.members and len(g.members) == 1 for g in groups)  # 16x16 not padded to 64
    assert max(len(g.members) for g in groups) == 4
    small = pack(
        [(64, 64)] * 4, max_units=8, max_pixels=2 * 64 * 64 * 16, max_pad_fraction=0, scale=4
    )
    assert [len(g.members) for g in small] == [2, 2]


def test_the_window_polls_without_blocking_and_asks_only_for_what_fits() -> None:
    """A short blocking read would end on Redis' 100 ms timer tick, not after max_wait_ms: every
    read of the window must be non-blocking (block None)."""
    arrivals: list[list[int]] = [[], [1, 2], []]
    calls: list[tuple[int, int | None]] = []

    def read(count: int, block_ms: int | None) -> list[int]:
        calls.append((count, block_ms))
        return arrivals.pop(0) if arrivals else []

    assert fill([0], read, max_batch=8, max_wait_ms=200) == [0, 1, 2]
    assert len(calls) >= 3 and all(block is None for _, block in calls)
    assert calls[2][0] == 5  # asks only for what still fits in the batch
    # A full batch ends the window at once; so does a stop, keeping what is in hand.
    arrivals[:], calls[:] = [[1, 2]], []
    assert fill([0], read, max_batch=3, max_wait_ms=60_000) == [0, 1, 2]
    assert calls == [(2, None)]
    arrivals[:], calls[:] = [[1]], []
    assert fill([0], read, max_batch=3, max_wait_ms=60_000, should_stop=lambda: True) == [0]
    assert calls == []
    # No window: nothing is read.
    assert fill([0], read, max_batch=3, max_wait_ms=0) == [0] and calls == []


def test_the_adaptive_window_closes_for_a_lone_caller_and_reopens_under_concurrency() -> None:
    """Waiting for batch-mates who never come is pure latency (a lone caller waited the whole
    MAX_WAIT_MS on every request): after two fruitless windows the adaptive window stays shut,
    probing every 8th batch, and a backlog or a probe that catches a job opens it again. The
    fixed window always waits."""
    window = BatchWindow("adaptive", fruitless_to_close=2, probe_every=8)

    def lone(caught: int = 0) -> tuple[int, str]:
        wait = window.wait_ms(1, max_batch=8, max_wait_ms=10)
        return wait, window.record(1, caught if wait else 0, wait)

    assert [lone() for _ in range(2)] == [(10, "fruitless")] * 2
    shut = [lone() for _ in range(16)]
    assert shut == ([(0, "skipped")] * 7 + [(10, "fruitless")]) * 2  # a probe every 8th batch
    assert lone(caught=1) == (0, "skipped")  # a job that came after the read waits its turn
    # A backlog (the first read found several jobs) opens it: those batches wait to fill up.
    assert window.wait_ms(3, max_batch=8, max_wait_ms=10) == 10
    assert window.record(3, 0, 10) == "backlog"
    assert lone(caught=1) == (10, "caught") and lone() == (10, "fruitless")
    assert lone() == (10, "fruitless") and lone() == (0, "skipped")
    # ... and so does a probe that catches one.
    for _ in range(6):
        lone()
    assert lone(caught=2) == (10, "caught") and lone()[0] == 10
    # A full first read needs no window; the fixed window waits whatever came before.
    assert window.wait_ms(8, max_batch=8, max_wait_ms=10) == 0
    fixed = BatchWindow("fixed")
    for _ in range(10):
        assert fixed.wait_ms(1, max_batch=8, max_wait_ms=10) == 10
        assert fixed.record(1, 0, 10) == "fruitless"


def test_max_batch_pixels_auto_depends_on_the_device(
    tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Engine(zoo_dir=tiny_zoo, device="cpu").max_batch_pixels == CPU_AUTO_BATCH_PIXELS
    assert resolve_batch_pixels("auto", torch.device("cuda")) == CUDA_AUTO_BATCH_PIXELS
    assert CPU_AUTO_BATCH_PIXELS < CUDA_AUTO_BATCH_PIXELS
    assert Engine(zoo_dir=tiny_zoo, device="cpu", max_batch_pixels=5000).max_batch_pixels == 5000
    # The budget really splits passes: two 64x64 images share one only if 2 x 64² fit.
    pair = [("tiny_style", image(64, 64, seed=s)) for s in range(2)]
    for budget, shared in [(64 * 64, 1), (2 * 64 * 64, 2)]:
        engine = Engine(zoo_dir=tiny_zoo, precision="fp32", max_batch_pixels=budget)
        assert [o.batch_size for o in engine.run(pair)] == [shared, shared]
    assert WorkerSettings(_env_file=None).max_batch_pixels == "auto"
    monkeypatch.setenv("MAX_BATCH_PIXELS", "131072")
    assert WorkerSettings(_env_file=None).max_batch_pixels == 131072
    monkeypatch.setenv("MAX_BATCH_PIXELS", "0")
    with pytest.raises(ValueError, match="MAX_BATCH_PIXELS"):
        WorkerSettings(_env_file=None)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MODELS", "mosaic, x4 ,")
    monkeypatch.setenv("TILE_OVERLAP", "48")
    monkeypatch.setenv("MAX_BATCH", "4")
    settings = WorkerSettings(_env_file=None)
    assert settings.worker_models == ["mosaic", "x4"]
    assert settings.tile_overlap == 48 and settings.max_batch == 4
    assert settings.queue_prefix == "imgsvc" and settings.whole_max_pixels == "auto"
    monkeypatch.setenv("WHOLE_MAX_PIXELS", "1000000")
    assert WorkerSettings(_env_file=None).whole_max_pixels == 1_000_000
    monkeypatch.setenv("WHOLE_MAX_PIXELS", "-1")
    with pytest.raises(ValueError, match="WHOLE_MAX_PIXELS"):
        WorkerSettings(_env_file=None)
    monkeypatch.setenv("WHOLE_MAX_PIXELS", "auto")
    monkeypatch.setenv("TILE_OVERLAP", "auto")
    monkeypatch.setenv("CLAIM_IDLE_MS", "100")
    monkeypatch.setenv("HEARTBEAT_INTERVAL_S", "1")
    with pytest.raises(ValueError, match="CLAIM_IDLE_MS"):
        WorkerSettings(_env_file=None)


# --- multi-style nets: per-sample styles in one pass, strength, mixes, keep-colours ------------


def _multi_reference(zoo: Path, pixels: np.ndarray, row: list[float]) -> np.ndarray:
    net, _ = load_model("tiny_multi", root=zoo)
    style = torch.tensor([row])
    return np.asarray(apply_to_image(net, Image.fromarray(pixels[..., :3]), style=style))


def test_different_styles_share_one_exact_pass(tiny_zoo: Path) -> None:
    add_tiny_multistyle(tiny_zoo)
    engine = Engine(
        zoo_dir=tiny_zoo, cpu_runtime="torch", precision="fp32", max_batch_pixels=1 << 22
    )
    assert engine.model("tiny_multi").exact_padding
    a, b = (
        StyleControls(slots=((1, 1.0),), identity=0),
        StyleControls(slots=((2, 1.0),), identity=0),
    )
    requests = [
        ("tiny_multi", image(40, 48, seed=1), a),
        ("tiny_multi", image(37, 50, seed=2), b),
        ("tiny_multi", image(40, 48, seed=3), b),
    ]
    together = engine.run(requests)
    assert [o.batch_size for o in together] == [3, 3, 3]
    for (_, pixels, controls), out in zip(requests, together, strict=True):
        row = [0.0, 1.0, 0.0] if controls is a else [0.0, 0.0, 1.0]
        assert max_diff(out.pixels, _multi_reference(tiny_zoo, pixels, row)) <= 1
    # The two styles really differ on the same photo.
    (other,) = engine.run([("tiny_multi", image(40, 48, seed=1), b)])
    assert max_diff(other.pixels, together[0].pixels) > 20


def test_strength_and_mix_are_convex_combinations_of_slots(tiny_zoo: Path) -> None:
    add_tiny_multistyle(tiny_zoo)
    engine = Engine(zoo_dir=tiny_zoo, precision="fp32")
    pixels = image(36, 44, seed=5)
    half = StyleControls(slots=((1, 0.7), (2, 0.3)), identity=0, strength=0.5)
    (out,) = engine.run([("tiny_multi", pixels, half)])
    assert max_diff(out.pixels, _multi_reference(tiny_zoo, pixels, [0.5, 0.35, 0.15])) <= 1
    zero = StyleControls(slots=((1, 1.0),), identity=0, strength=0.0)
    (identity,) = engine.run([("tiny_multi", pixels, zero)])
    assert max_diff(identity.pixels, _multi_reference(tiny_zoo, pixels, [1.0, 0.0, 0.0])) <= 1
    with pytest.raises(ValueError, match="slots"):
        engine.run([("tiny_multi", pixels, StyleControls(slots=((7, 1.0),)))])


def test_tiles_of_a_conditional_net_match_the_whole_image(tiny_zoo: Path) -> None:
    add_tiny_multistyle(tiny_zoo)
    controls = StyleControls(slots=((2, 1.0),), identity=0)
    pixels = image(150, 170, seed=9)
    whole = Engine(zoo_dir=tiny_zoo, precision="fp32", tile_size=1024)
    tiled = Engine(zoo_dir=tiny_zoo, precision="fp32", tile_size=64, tile_stats_size=4096)
    (a,) = whole.run([("tiny_multi", pixels, controls)])
    (b,) = tiled.run([("tiny_multi", pixels, controls)])
    assert tiled._tile_plan(tiled.model("tiny_multi"), 152, 172) is not None
    assert max_diff(a.pixels, b.pixels) <= 1


def test_keep_colors_takes_chroma_from_the_photo_and_luma_from_the_style(tiny_zoo: Path) -> None:
    engine = Engine(zoo_dir=tiny_zoo, precision="fp32")
    pixels = image(48, 40, seed=4)
    (styled,) = engine.run([("tiny_style", pixels)])
    (kept,) = engine.run([("tiny_style", pixels, StyleControls(keep_colors=True))])
    # Pillow's own YCbCr (BT.601 full range) as the independent reference. Its fixed-point
    # round trip quantises three times and reads about 1 level high on average.
    y, _, _ = Image.fromarray(styled.pixels).convert("YCbCr").split()
    _, cb, cr = Image.fromarray(pixels).convert("YCbCr").split()
    expected = np.asarray(Image.merge("YCbCr", (y, cb, cr)).convert("RGB"))
    assert max_diff(kept.pixels, expected) <= 4
    assert np.abs(kept.pixels.astype(float) - expected).mean() < 1.5
    assert max_diff(kept.pixels, styled.pixels) > 20


def test_strength_without_identity_slot_blends_with_the_photo(tiny_zoo: Path) -> None:
    engine = Engine(zoo_dir=tiny_zoo, precision="fp32")
    pixels = image(32, 32, seed=6)
    (full,) = engine.run([("tiny_style", pixels)])
    (half,) = engine.run([("tiny_style", pixels, StyleControls(strength=0.25))])
    expected = 0.25 * full.pixels.astype(np.float64) + 0.75 * pixels.astype(np.float64)
    assert np.abs(half.pixels - expected).max() <= 1.01


# --- the CPU runtime: OpenVINO for whole images of style nets ----------------------------------


def test_openvino_serves_whole_style_images_with_the_reference_pixels(tiny_zoo: Path) -> None:
    add_tiny_multistyle(tiny_zoo)
    engine = Engine(zoo_dir=tiny_zoo, precision="fp32", cpu_runtime="openvino")
    assert engine.model("tiny_style").runtime == "openvino"
    assert engine.model("tiny_multi").runtime == "openvino"
    assert engine.model("x4").runtime == "torch"  # SR nets stay in PyTorch
    pixels = image(45, 39, seed=2)
    (out,) = engine.run([("tiny_style", pixels)])
    assert max_diff(out.pixels, reference(tiny_zoo, "tiny_style", pixels)) <= 1
    controls = StyleControls(slots=((2, 1.0),), identity=0, strength=0.5)
    (multi,) = engine.run([("tiny_multi", pixels, controls)])
    assert max_diff(multi.pixels, _multi_reference(tiny_zoo, pixels, [0.5, 0.0, 0.5])) <= 1


@pytest.mark.parametrize("size", [(1, 1), (3, 300), (4, 4), (2, 57), (57, 3)])
def test_openvino_serves_images_with_a_side_under_eight_pixels_as_pytorch_does(
    tiny_zoo: Path, size: tuple[int, int]
) -> None:
    """A side of 4 px or less leaves the net's residual blocks a 1-px map, where reflection
    padding is undefined: PyTorch pads such inputs to 8 px inside ``forward``, the export does
    not. OpenVINO then kept its previous output and the engine returned a crop of *another
    request's* picture (found serving an 8000 x 3 px upload)."""
    add_tiny_multistyle(tiny_zoo)
    engine = Engine(zoo_dir=tiny_zoo, precision="fp32", cpu_runtime="openvino")
    other = image(64, 300, seed=11)  # what an earlier request left in OpenVINO's output
    for name in ("tiny_style", "tiny_multi"):
        assert engine.model(name).runtime == "openvino"
        engine.run([(name, other)])
        pixels = image(*size, seed=12)
        (out,) = engine.run([(name, pixels)])
        expected = (
            reference(tiny_zoo, name, pixels)
            if name == "tiny_style"
            else _multi_reference(tiny_zoo, pixels, [1.0, 0.0, 0.0])
        )
        assert max_diff(out.pixels, expected) <= 1


def test_openvino_tiles_of_a_thin_image_are_pytorchs_tiles(tiny_zoo: Path) -> None:
    """The same padding on the tiles' export (borrowed statistics): a 3 px high strip cut
    into 64 px tiles."""
    settings = {"precision": "fp32", "tile_size": 64, "whole_max_pixels": 0}
    ov = Engine(zoo_dir=tiny_zoo, cpu_runtime="openvino", **settings)  # type: ignore[arg-type]
    pt = Engine(zoo_dir=tiny_zoo, cpu_runtime="torch", **settings)  # type: ignore[arg-type]
    ov.run([("tiny_style", image(64, 300, seed=11))])
    pixels = image(3, 300, seed=12)
    (out,), (expected,) = ov.run([("tiny_style", pixels)]), pt.run([("tiny_style", pixels)])
    assert out.tiled and expected.tiled
    assert max_diff(out.pixels, expected.pixels) <= 1


def test_openvino_output_of_another_size_than_its_input_is_refused(tiny_zoo: Path) -> None:
    """The executor's last line of defence, on what OpenVINO really does: given a 4 x 4 input
    without the net's padding, it answers with no error and the previous call's output."""
    net, _ = load_model("tiny_style", root=tiny_zoo)
    executor = openvino_runtime.OpenVINOExecutor(net, threads=1)
    executor(torch.rand(1, 3, 16, 64), None, "f32")
    request = executor._request("f32")
    inputs = {"image": np.random.rand(1, 3, 4, 4).astype(np.float32)}
    inputs["style"] = np.ones((1, 1), np.float32)
    stale = np.array(next(iter(request.infer(inputs).values())))
    with pytest.raises(RuntimeError, match=r"1x3x16x64 output for a 1x3x4x4 input"):
        openvino_runtime.check_output(stale, (1, 3, 4, 4))
    openvino_runtime.check_output(stale, (1, 3, 16, 64))  # the right size passes


def test_openvino_batches_equal_sizes_and_never_pads(tiny_zoo: Path) -> None:
    """A second runtime for whole images must not make pixels depend on the batch: same-size
    images share a pass, images of other sizes get passes of their own."""
    for precision in ("fp32", "bf16"):
        engine = Engine(
            zoo_dir=tiny_zoo,
            precision=precision,
            min_psnr_db=0,
            cpu_runtime="openvino",
            max_batch_pixels=1 << 22,
        )
        requests = [("tiny_style", image(40, 48, seed=s)) for s in range(3)]
        requests.append(("tiny_style", image(37, 50, seed=9)))
        together = engine.run(requests)
        assert [o.batch_size for o in together] == [3, 3, 3, 1]
        for request, out in zip(requests, together, strict=True):
            (alone,) = engine.run([request])
            # bf16 kernels depend on the batch size too: agreement within the precision gate
            if precision == "fp32":
                assert max_diff(out.pixels, alone.pixels) <= 1
            else:
                assert psnr(out.pixels, alone.pixels) >= 40


def test_openvino_precision_is_calibrated_against_pytorch_fp32(tiny_zoo: Path) -> None:
    engine = Engine(zoo_dir=tiny_zoo, precision="bf16", cpu_runtime="openvino")
    model = engine.model("tiny_style")
    assert model.runtime == "openvino"
    if openvino_runtime.runs_bf16():
        assert model.calibration_psnr_db < float("inf")
        # OpenVINO's bf16 costs this tiny untrained net ~32 dB: the gate must refuse it.
        assert model.precision == ("bf16" if model.calibration_psnr_db >= 40 else "fp32")
    else:  # its f32, which is all this CPU offers, measured against PyTorch's
        assert model.precision == "fp32" and model.calibration_psnr_db >= 40
    pixels = image(48, 48, seed=3)
    (out,) = engine.run([("tiny_style", pixels)])
    assert psnr(out.pixels, reference(tiny_zoo, "tiny_style", pixels)) >= 40


@pytest.mark.parametrize("name", ["tiny_style", "tiny_multi"])
def test_openvino_runs_tiles_with_borrowed_statistics(tiny_zoo: Path, name: str) -> None:
    """Tiles of a large image run in OpenVINO's frozen-statistics export and still form the
    image the whole pass gives (PyTorch fp32 is the reference)."""
    add_tiny_multistyle(tiny_zoo)
    controls = StyleControls(slots=((2, 1.0),), identity=0) if name == "tiny_multi" else None
    pixels = image(150, 190, seed=11)
    request = (name, pixels) if controls is None else (name, pixels, controls)
    engine = Engine(
        zoo_dir=tiny_zoo,
        precision="fp32",
        cpu_runtime="openvino",
        tile_size=96,
        tile_stats_size=4096,
        whole_max_pixels=0,
    )
    model = engine.model(name)
    assert model.executor is not None and model.executor.takes_frozen_stats
    plan = engine._tile_plan(model, 152, 192)
    assert plan is not None and len(plan.tiles) >= 4
    before = model.executor.passes["frozen"]
    (tiles,) = engine.run([request])
    assert tiles.tiled
    assert model.executor.passes["frozen"] - before >= 1  # the tiles did not fall back
    whole = Engine(zoo_dir=tiny_zoo, precision="fp32", cpu_runtime="torch", tile_size=4096)
    (expected,) = whole.run([request])
    assert max_diff(tiles.pixels, expected.pixels) <= 1
    # Statistics are inputs, not constants of the export: wrong ones change the picture.
    padded = pad_to_stride(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, 4)
    _, stats = engine._forward(model, [padded], [None], want_stats=True, runtime="torch")
    assert stats is not None
    shifted = [[(mean + 0.5, var * 2) for mean, var in stats[0]]]
    rows = [model.style_rows()[-1]]
    (own,), _ = engine._forward(model, [padded], [stats[0]], styles=rows)
    (off,), _ = engine._forward(model, [padded], shifted, styles=rows)
    assert float((own - off).abs().max()) > 0.05


def test_should_stop_drops_a_request_between_passes_and_spares_the_others(
    tiny_zoo: Path,
) -> None:
    """The cancellation hook: called before every forward pass (so between tiles); a request
    it names is not computed further, its batch-mates are, with their exact pixels."""
    engine = Engine(zoo_dir=tiny_zoo, precision="fp32", tile_size=64, max_batch=1)
    big, small = image(150, 190, seed=8), image(20, 24, seed=9)
    (alone,) = engine.run([("tiny_style", small)])
    calls: list[int] = []

    def should_stop() -> set[int]:
        calls.append(len(calls))
        return {0} if len(calls) >= 3 else set()

    stopped, kept = engine.run([("tiny_style", big), ("tiny_style", small)], should_stop)
    plan = engine._tile_plan(engine.model("tiny_style"), 152, 192)
    assert plan is not None
    passes_if_finished = 2 + len(plan.tiles)  # stats pass + small image, then every tile
    assert stopped.stopped and stopped.pixels.size == 0
    assert not kept.stopped and np.array_equal(kept.pixels, alone.pixels)
    assert len(calls) == 3 < passes_if_finished  # asked before each pass it still ran
    # without the hook, the same engine computes everything
    finished, _ = engine.run([("tiny_style", big), ("tiny_style", small)])
    assert not finished.stopped and finished.pixels.shape == (150, 190, 3)


def test_worker_models_may_name_styles_of_a_multistyle_net(tiny_zoo: Path) -> None:
    add_tiny_multistyle(tiny_zoo)
    engine = Engine(zoo_dir=tiny_zoo, cpu_runtime="torch", precision="fp32")
    # two styles of one net load it once; a model name still means the model
    assert engine.load(["ms_a", "ms_b", "tiny_style"]) == ["tiny_multi", "tiny_style"]
    assert set(engine.models) == {"tiny_multi", "tiny_style"}
    with pytest.raises(Exception, match="no model named 'nope'"):
        engine.load(["nope"])


@pytest.mark.parametrize("frozen", [False, True])
def test_openvino_split_into_a_head_and_a_tail_is_the_same_net(
    tiny_zoo: Path, frozen: bool
) -> None:
    """A float32 head and a reduced-precision tail are two compiled pieces with the features
    (and each piece's share of borrowed statistics) passed between them; in f32 every split
    point gives the whole net's output."""
    add_tiny_multistyle(tiny_zoo)
    net, _ = load_model("tiny_multi", root=tiny_zoo)
    executor = openvino_runtime.OpenVINOExecutor(net, threads=1)
    assert executor.max_head == len(net.layers()) - 1
    canvas = pad_to_stride(torch.from_numpy(image(50, 44, seed=4)).permute(2, 0, 1)[None] / 255, 4)
    rows = torch.tensor([[0.0, 0.3, 0.7]])
    stats = None
    if frozen:
        engine = Engine(zoo_dir=tiny_zoo, precision="fp32", cpu_runtime="torch")
        _, measured = engine._forward(
            engine.model("tiny_multi"), [canvas], [None], want_stats=True, styles=[rows]
        )
        assert measured is not None
        stats = [measured[0]]
    whole = executor(canvas, rows, "f32", frozen=stats)
    with torch.no_grad():
        expected = net(canvas, rows)
    assert float((whole - expected).abs().max()) < 1e-4
    for head in range(1, executor.max_head + 1):
        # "bf16" with a head: where OpenVINO has no bf16 kernels the tail runs f32 too, and
        # the pieces must then agree with the whole to rounding.
        split = executor(canvas, rows, "bf16", frozen=stats, head=head)
        if not openvino_runtime.runs_bf16():
            assert float((split - whole).abs().max()) < 1e-4
        else:
            assert psnr(uint8_image(split), uint8_image(whole)) >= 25
    with pytest.raises(ValueError, match="splits after"):
        executor(canvas, rows, "bf16", head=executor.max_head + 1)


def test_calibration_keeps_the_fewest_float32_layers_that_pass_the_gate(tiny_zoo: Path) -> None:
    """Where bf16 fails the gate, the first layers move to float32 one at a time, up to
    ``MAX_FULL_PRECISION_HEAD``; the first that passes is served. PyTorch's bf16 autocast
    rounds on every CPU, so the ladder is exercised everywhere."""
    add_tiny_multistyle(tiny_zoo)
    options = {"zoo_dir": tiny_zoo, "precision": "bf16", "cpu_runtime": "torch"}
    plain = Engine(**options, min_psnr_db=0.0).model("tiny_multi")
    assert plain.precision == "bf16" and plain.full_precision_head == 0
    # An impossible bar: every rung fails; the last rung's figure is kept, fp32 is served.
    strict = Engine(**options, min_psnr_db=500.0).model("tiny_multi")
    assert strict.precision == "fp32" and strict.full_precision_head == 0
    assert strict.net.full_precision_head == 0
    deepest = strict.calibration_psnr_db
    assert deepest > plain.calibration_psnr_db  # less rounding, closer to fp32
    gate = (plain.calibration_psnr_db + deepest) / 2
    chosen = Engine(**options, min_psnr_db=gate).model("tiny_multi")
    assert chosen.precision == "bf16"
    assert 1 <= chosen.full_precision_head <= MAX_FULL_PRECISION_HEAD
    assert chosen.net.full_precision_head == chosen.full_precision_head
    assert chosen.calibration_psnr_db >= gate

"""Which model ``/upscale?factor=F`` serves when a request names none: chosen from stored
measurements (``evaluation.sr.choose_default_upscalers``), kept in the manifest, and honoured
by the API (with ``X-Model`` saying which), ``GET /styles``, the client's command line and
``python -m worker.apply``, on a real stack (uvicorn, a worker, redis-server, tiny nets)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from evaluation.sr import choose_default_upscalers, store_default_upscalers
from imgsvc_client.cli import main as client_cli
from model_zoo import registry
from model_zoo.manifest import Manifest, read_manifest, write_manifest
from tests.conftest import add_tiny_pixel_sr
from tests.test_e2e_serving import (
    Stack,
    assert_close,
    decode,
    image_array,
    png_bytes,
    reference,
    stack_on_a_zoo_copy,
)
from worker import apply

LPIPS_FP32 = {"lpips": "vgg (fp32)", "lr": "train degradation, uint8"}


def _store(zoo: Path, name: str, scores: dict[str, float], **protocol: str) -> None:
    """Stored SR metrics as ``python -m evaluation sr`` writes them (one image per set)."""
    sets = {s: {"lpips": v, "psnr": 25.0, "images": 1} for s, v in scores.items()}
    registry.update_metrics(name, {"sr": {"protocol": LPIPS_FP32 | protocol, "sets": sets}}, zoo)


@pytest.fixture()
def zoo(tiny_zoo: Path) -> Path:
    """The tiny zoo with a second x4 net, ``x4_pixel``."""
    add_tiny_pixel_sr(tiny_zoo, seed=3)
    return tiny_zoo


def test_the_lowest_mean_lpips_over_the_shared_sets_wins(zoo: Path) -> None:
    _store(zoo, "x4", {"A": 0.30, "B": 0.40, "C": 0.10})
    _store(zoo, "x4_pixel", {"A": 0.25, "B": 0.40})  # C unmeasured: only A and B compare
    defaults, reasons = choose_default_upscalers(read_manifest(zoo))
    assert defaults == {4: "x4_pixel", 8: "x8"}
    assert reasons[0] == "x4: x4_pixel (mean LPIPS over A, B: x4_pixel 0.3250, x4 0.3500)"
    assert reasons[1] == "x8: x8 (the only x8 model)"

    assert store_default_upscalers(str(zoo)) == reasons
    manifest = read_manifest(zoo)
    assert manifest.default_upscalers == {4: "x4_pixel", 8: "x8"}
    assert manifest.default_upscaler(4) == "x4_pixel"


def test_numbers_measured_differently_do_not_compare(zoo: Path) -> None:
    _store(zoo, "x4", {"A": 0.30})
    _store(zoo, "x4_pixel", {"A": 0.20}, lpips="vgg (bf16)")
    defaults, reasons = choose_default_upscalers(read_manifest(zoo))
    assert defaults == {8: "x8"}  # x4 unchanged: none stored, so the one named x4
    assert reasons[0] == "x4: kept x4 (no set measured alike for x4, x4_pixel)"


def test_an_unmeasured_net_keeps_the_current_default(zoo: Path) -> None:
    """New weights start without metrics: they must neither win nor lose by default."""
    _store(zoo, "x4", {"A": 0.30})
    manifest = read_manifest(zoo)
    manifest.default_upscalers = {4: "x4_pixel"}
    write_manifest(manifest, zoo)
    defaults, reasons = choose_default_upscalers(read_manifest(zoo))
    assert defaults[4] == "x4_pixel"
    assert reasons[0] == "x4: kept x4_pixel (no set measured alike for x4_pixel)"


def test_the_manifest_refuses_a_default_that_cannot_serve_the_factor(zoo: Path) -> None:
    payload = read_manifest(zoo).model_dump(mode="json")
    for wrong in ("x8", "tiny_style", "missing"):
        with pytest.raises(ValueError, match=f"default x4 upscaler '{wrong}' is not an x4 model"):
            Manifest.model_validate(payload | {"default_upscalers": {"4": wrong}})
    assert Manifest.model_validate(payload | {"default_upscalers": {"4": "x4_pixel"}})

    # New weights under the default's name that upscale by another factor drop the default.
    manifest = Manifest.model_validate(payload | {"default_upscalers": {"4": "x4_pixel"}})
    moved = manifest.get("x4_pixel").model_copy(update={"factor": 8})
    manifest.upsert(moved)
    assert manifest.default_upscalers == {}


def test_apply_upscales_with_the_default(zoo: Path, tmp_path: Path) -> None:
    manifest = read_manifest(zoo)
    manifest.default_upscalers = {4: "x4_pixel"}
    write_manifest(manifest, zoo)
    source = image_array(12, 10, seed=5)
    Image.fromarray(source).save(tmp_path / "small.png")
    argv = ["--zoo", str(zoo), "--precision", "fp32", "--upscale", "4", str(tmp_path / "small.png")]
    assert apply.main([*argv, "-o", str(tmp_path / "default.png")]) == 0
    assert apply.main([*argv, "--sr-model", "x4", "-o", str(tmp_path / "named.png")]) == 0
    default = np.asarray(Image.open(tmp_path / "default.png"))
    assert_close(default, reference(zoo, "x4_pixel", source))
    assert np.abs(default.astype(int) - np.asarray(Image.open(tmp_path / "named.png"))).max() > 1
    assert "x4_pixel             x4 (pixel loss, default for x4)" in apply.list_zoo(str(zoo))


@pytest.fixture(scope="module")
def stack(
    redis_instance: Any, tiny_zoo_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A stack on its own zoo: the tiny zoo plus ``x4_pixel``, the default for x4."""

    def add_the_default(zoo: Path) -> None:
        add_tiny_pixel_sr(zoo, seed=3)
        manifest = read_manifest(zoo)
        manifest.default_upscalers = {4: "x4_pixel"}
        write_manifest(manifest, zoo)

    with stack_on_a_zoo_copy(
        redis_instance.url, tiny_zoo_template, tmp_path_factory, "default", add_the_default
    ) as service:
        yield service


@pytest.mark.slow
def test_the_service_serves_the_default_and_says_which(stack: Stack, tmp_path: Path) -> None:
    source = image_array(12, 10, seed=4)
    body = png_bytes(source)
    with stack.client() as http:
        upscalers = {m["name"]: m["default"] for m in http.get("/styles").json()["upscalers"]}
        assert upscalers == {"x4": False, "x4_pixel": True, "x8": True}

        plain = http.post("/upscale?factor=4", content=body, headers={"content-type": "image/png"})
        assert plain.status_code == 200, plain.text
        assert plain.headers["x-model"] == "x4_pixel"
        assert_close(decode(plain), reference(stack.zoo, "x4_pixel", source))

        named = http.post(
            "/upscale?factor=4&model=x4", content=body, headers={"content-type": "image/png"}
        )
        assert named.headers["x-model"] == "x4"
        assert_close(decode(named), reference(stack.zoo, "x4", source))

        queued = http.post(
            "/upscale?factor=4&mode=async", content=body, headers={"content-type": "image/png"}
        )
        assert queued.status_code == 202 and queued.headers["x-model"] == "x4_pixel"
        fetched = _wait_for(http, queued.json()["status_url"])
        assert fetched.headers["x-model"] == "x4_pixel"

    # The client's command line names its outputs after the model the service used.
    Image.fromarray(source).save(tmp_path / "a.png")
    argv = ["upscale", str(tmp_path / "a.png"), "--factor", "4", "-q", "--url", stack.url]
    assert client_cli(argv) == 0
    made = np.asarray(Image.open(tmp_path / "a.x4_pixel.png"))
    assert_close(made, reference(stack.zoo, "x4_pixel", source))


def _wait_for(http: httpx.Client, url: str) -> httpx.Response:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        resp = http.get(url)
        if resp.status_code != 202:
            assert resp.status_code == 200, resp.text
            return resp
        time.sleep(0.05)
    raise AssertionError(f"{url} still pending after 60 s")

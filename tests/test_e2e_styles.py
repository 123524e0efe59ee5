"""The style controls end to end: real API, Redis and worker with a tiny multi-style net.

``style`` names a slot of the multi-style net, ``mix`` blends slots, ``strength`` moves weight to
the identity slot, ``keep_colors`` keeps the photo's chroma and ``max_side`` shrinks the photo;
every answer must be what the plain fp32 reference path gives for the same style row.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model_zoo.imaging import tensor_to_uint8, uint8_to_tensor
from model_zoo.reference import run_model
from model_zoo.registry import load_model

from .conftest import add_tiny_multistyle
from .test_e2e_serving import (
    Stack,
    assert_close,
    decode,
    image_array,
    post_image,
    stack_on_a_zoo_copy,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(
    redis_instance: Any, tiny_zoo_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with stack_on_a_zoo_copy(
        redis_instance.url, tiny_zoo_template, tmp_path_factory, "styles", add_tiny_multistyle
    ) as service:
        yield service


@pytest.fixture()
def client(stack: Stack) -> Iterator[httpx.Client]:
    stack.wait_ready()
    with stack.client() as http:
        yield http


def reference(zoo: Path, rgb: np.ndarray, row: list[float]) -> np.ndarray:
    net, _ = load_model("tiny_multi", root=zoo)
    return tensor_to_uint8(run_model(net, uint8_to_tensor(rgb), style=torch.tensor([row])))[0]


def test_styles_lists_every_public_slot(client: httpx.Client) -> None:
    styles = {s["name"]: s for s in client.get("/styles").json()["styles"]}
    assert {"ms_a", "ms_b", "mosaic", "tiny_style"} <= set(styles)
    assert "identity" not in styles  # the identity slot is what strength mixes in, not a style
    assert styles["ms_b"]["model"] == "tiny_multi" and styles["ms_b"]["slot"] == 2
    assert styles["ms_b"]["mixable"] and not styles["mosaic"]["mixable"]


@pytest.mark.parametrize(
    ("query", "row"),
    [
        ("style=ms_a", [0.0, 1.0, 0.0]),
        ("style=ms_b", [0.0, 0.0, 1.0]),
        ("mix=ms_a:0.7,ms_b:0.3", [0.0, 0.7, 0.3]),
        ("mix=ms_a:7,ms_b:3&strength=0.5", [0.5, 0.35, 0.15]),
        ("mix=ms_a:1e308,ms_b:1e308", [0.0, 0.5, 0.5]),  # huge weights: no overflow to inf
        ("style=ms_b&strength=0", [1.0, 0.0, 0.0]),
    ],
)
def test_slots_mixes_and_strength(
    stack: Stack, client: httpx.Client, query: str, row: list[float]
) -> None:
    source = image_array(36, 28, seed=len(query))
    resp = post_image(client, f"/stylize?{query}", source)
    assert resp.status_code == 200, resp.text
    assert_close(decode(resp), reference(stack.zoo, source, row))


def test_keep_colors_keeps_the_photos_chroma(stack: Stack, client: httpx.Client) -> None:
    source = image_array(40, 32, seed=3)
    styled = decode(post_image(client, "/stylize?style=ms_a", source))
    kept = decode(post_image(client, "/stylize?style=ms_a&keep_colors=true", source))
    _, cb_src, cr_src = (
        np.asarray(c, float) for c in Image.fromarray(source).convert("YCbCr").split()
    )
    y_styled = np.asarray(Image.fromarray(styled).convert("YCbCr").split()[0], float)
    y_kept, cb_kept, cr_kept = (
        np.asarray(c, float) for c in Image.fromarray(kept).convert("YCbCr").split()
    )
    # Chroma from the photo, luma from the stylised image (a few levels of RGB clipping and
    # Pillow's fixed-point rounding aside).
    assert np.median(np.abs(cb_kept - cb_src)) <= 2 and np.median(np.abs(cr_kept - cr_src)) <= 2
    assert np.median(np.abs(y_kept - y_styled)) <= 2
    assert np.abs(styled.astype(int) - kept.astype(int)).max() > 10


def test_max_side_shrinks_the_photo_before_stylising(client: httpx.Client) -> None:
    source = image_array(64, 40, seed=8)
    resp = post_image(client, "/stylize?style=ms_a&max_side=32", source)
    assert resp.status_code == 200, resp.text
    assert decode(resp).shape == (20, 32, 3)
    small = post_image(client, "/stylize?style=ms_a&max_side=100", source)
    assert decode(small).shape == (40, 64, 3)  # never enlarged


def test_an_unknown_style_in_a_mix_lists_the_styles(client: httpx.Client) -> None:
    resp = post_image(client, "/stylize?mix=ms_a:0.5,nope:0.5", image_array(16, 16))
    assert resp.status_code == 404
    body = resp.json()
    assert body["error"] == "unknown_style" and "ms_b" in body["styles"]
    resp = post_image(client, "/stylize?mix=ms_a:0.5,mosaic:0.5", image_array(16, 16))
    assert resp.status_code == 422 and resp.json()["error"] == "invalid_style_mix"
    assert "different nets" in resp.json()["detail"]

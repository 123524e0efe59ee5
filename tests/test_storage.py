"""fp16 storage of zoo weights (``training.storage``): half the bytes, upcast at load, and
refused where the rounding would cost more than the worker's 40 dB gate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model_zoo.manifest import read_manifest, write_manifest
from model_zoo.nets import ConditionalInstanceNorm2d
from model_zoo.registry import load_model, save_model, sha256_file
from training.storage import StorageRefused, main, store_half

from .conftest import add_tiny_multistyle

SHIPPED = Path(__file__).resolve().parents[1] / "model_zoo"


def _dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as handle:
        return {handle.get_tensor(key).dtype for key in handle.keys()}  # noqa: SIM118


def test_half_storage_halves_the_file_and_loads_as_fp32(tiny_zoo: Path) -> None:
    add_tiny_multistyle(tiny_zoo)
    for name in ("x4", "tiny_multi"):
        before, entry = load_model(name, root=tiny_zoo)
        path = tiny_zoo / entry.weights
        size = path.stat().st_size
        record = store_half(name, tiny_zoo)
        assert path.stat().st_size < 0.6 * size
        assert _dtypes(path) <= {torch.float16, torch.int64}  # BatchNorm's counter stays int
        stored = read_manifest(tiny_zoo).get(name)
        assert stored.sha256 == sha256_file(path) != entry.sha256
        assert stored.metrics["storage"] == record and record["fp32_sha256"] == entry.sha256
        psnr = record["psnr_db_vs_fp32"]
        assert psnr == "inf" or psnr >= 40
        # load_model verifies the new sha256 and upcasts: every parameter is fp32 again, equal
        # to the fp16 rounding of the original.
        after, _ = load_model(name, root=tiny_zoo)
        for (key, a), b in zip(
            before.state_dict().items(), after.state_dict().values(), strict=True
        ):
            assert b.dtype == a.dtype, key
            if a.is_floating_point():
                torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0, msg=key)
        # A second run is a no-op, not a second rounding of already-rounded weights.
        assert store_half(name, tiny_zoo) == record
        assert sha256_file(path) == stored.sha256


def test_retrained_weights_are_stored_again_whatever_the_old_record_says(tiny_zoo: Path) -> None:
    """A new export of a model that was stored in fp16 is fp32 and carries no storage record;
    and a record that outlived its weights (fp32 on disk) does not stop a new rounding."""
    store_half("x4", tiny_zoo)
    net, entry = load_model("x4", root=tiny_zoo)
    old = read_manifest(tiny_zoo).get("x4").metrics["storage"]
    fields = entry.model_dump(include={"factor", "loss", "description", "training"})
    save_model(net, name="x4", kind="sr", arch=entry.arch, root=tiny_zoo, **fields)
    fresh = read_manifest(tiny_zoo).get("x4")
    assert "storage" not in fresh.metrics
    assert _dtypes(tiny_zoo / fresh.weights) == {torch.float32, torch.int64}
    # A stale record (as a manifest edited by hand, or written before this rule) is checked
    # against the file, not trusted.
    manifest = read_manifest(tiny_zoo)
    manifest.get("x4").metrics["storage"] = old
    write_manifest(manifest, tiny_zoo)
    record = store_half("x4", tiny_zoo)
    assert record["fp32_sha256"] == fresh.sha256 != old["fp32_sha256"]
    assert _dtypes(tiny_zoo / fresh.weights) <= {torch.float16, torch.int64}


def test_rounding_that_changes_the_output_is_refused(tiny_zoo: Path) -> None:
    """Weights far below fp16's resolution: instance norm divides their scale out, so in fp32
    they work, but in fp16 they round to a handful of subnormal steps and the output changes."""
    add_tiny_multistyle(tiny_zoo)
    net, entry = load_model("tiny_multi", root=tiny_zoo)
    first = net.encoder[0]
    assert isinstance(first.norm, ConditionalInstanceNorm2d)
    with torch.no_grad():
        first.conv.conv.weight.mul_(1e-7)
        first.conv.conv.bias.mul_(1e-7)
    save_model(
        net, name="tiny_multi", kind="style", arch=entry.arch, root=tiny_zoo, styles=entry.styles
    )
    path = tiny_zoo / entry.weights
    before = path.read_bytes()
    with pytest.raises(StorageRefused, match="kept fp32"):
        store_half("tiny_multi", tiny_zoo)
    assert path.read_bytes() == before
    assert "storage" not in read_manifest(tiny_zoo).get("tiny_multi").metrics
    assert main(["--zoo", str(tiny_zoo), "--models", "tiny_multi", "x8"]) == 1  # one refused
    assert read_manifest(tiny_zoo).get("x8").metrics["storage"]["dtype"] == "fp16"


def test_shipped_half_weights_record_their_check() -> None:
    """What the shipped zoo stores in fp16 was checked against its fp32 weights when written."""
    half = [e for e in read_manifest(SHIPPED).models if "storage" in e.metrics]
    assert half, "the shipped zoo stores nothing in fp16 (the GPU campaign's size budget needs it)"
    for entry in half:
        record = entry.metrics["storage"]
        assert record["dtype"] == "fp16" and len(record["fp32_sha256"]) == 64
        assert record["psnr_db_vs_fp32"] == "inf" or record["psnr_db_vs_fp32"] >= 40
        assert record["min_psnr_db"] >= 40
        assert _dtypes(SHIPPED / entry.weights) <= {torch.float16, torch.int64}

"""Transform nets: exact output sizes for any input, documented size, config round-trip."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from model_zoo.config import MultiStyleNetConfig, SRNetConfig, StyleNetConfig
from model_zoo.hardware import auto_precision, resolve_compute
from model_zoo.nets import MultiStyleNet, SRNet, StyleNet, build_net, count_parameters


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (17, 33), (64, 48), (31, 30)])
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("upsample", ["nearest+conv", "transposed"])
def test_style_net_keeps_any_input_size(size: tuple[int, int], norm: str, upsample: str) -> None:
    net = StyleNet(StyleNetConfig(base_channels=8, num_residual=1, norm=norm, upsample=upsample))
    net.eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, *size)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("factor", [4, 8])
@pytest.mark.parametrize("size", [(1, 1), (9, 11), (16, 16)])
@pytest.mark.parametrize("output", ["tanh", "bicubic_residual"])
def test_sr_net_scales_exactly(factor: int, size: tuple[int, int], output: str) -> None:
    net = SRNet(SRNetConfig(factor=factor, channels=8, num_residual=1, output=output)).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, size[0] * factor, size[1] * factor)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("factor", [4, 8])
def test_untrained_residual_sr_net_is_bicubic(factor: int) -> None:
    """The zero-initialised head starts training from the bicubic baseline, not from grey."""
    net = SRNet(SRNetConfig(factor=factor, channels=8, num_residual=1, output="bicubic_residual"))
    x = torch.rand(2, 3, 12, 10)
    with torch.no_grad():
        out = net.eval()(x)
    bicubic = F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False)
    inner = (..., slice(2 * factor, -2 * factor), slice(2 * factor, -2 * factor))
    # Identical away from the border, where only the border rule (reflect vs clamp) differs.
    torch.testing.assert_close(out[inner], bicubic.clamp(0, 1)[inner], atol=1e-5, rtol=0)


def test_residual_sr_net_clips_only_at_inference() -> None:
    """Clipping in training would zero the gradient of overshooting pixels for good."""
    net = SRNet(SRNetConfig(factor=4, channels=8, num_residual=1, output="bicubic_residual"))
    torch.nn.init.constant_(net.tail.conv.bias, 2.0)  # every pixel overshoots
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    train_out = net.train()(x)
    assert train_out.min() > 1
    train_out.mean().backward()
    assert net.tail.conv.bias.grad is not None and net.tail.conv.bias.grad.abs().min() > 0
    with torch.no_grad():
        assert net.eval()(x).max() == 1


def test_auto_precision_uses_bf16_only_where_the_cpu_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert auto_precision(cpu) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert auto_precision(cpu) == "bf16"
    assert auto_precision(torch.device("cuda"), "bf16") == "bf16"
    assert auto_precision(torch.device("cuda")) == "fp16"


def test_asking_for_bf16_on_a_cpu_without_it_is_honoured_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level(logging.WARNING, logger="model_zoo.hardware"):
        assert resolve_compute("cpu", "bf16").precision == "bf16"
        assert "emulated" in caplog.text and "'auto' picks fp32" in caplog.text
        caplog.clear()
        assert resolve_compute("cpu", "auto").precision == "fp32"
        assert resolve_compute("cpu", "fp32").precision == "fp32"
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
        assert resolve_compute("cpu", "bf16").precision == "bf16"
    assert caplog.text == ""  # only the emulated case warns


def test_style_net_parameter_count_matches_paper() -> None:
    # PAPER.md: about 1.68 M parameters.
    assert 1_600_000 <= count_parameters(StyleNet()) <= 1_750_000


def test_sr_net_stage_count_follows_factor() -> None:
    x4, x8 = SRNet(SRNetConfig(factor=4)), SRNet(SRNetConfig(factor=8))
    assert len(x4.upsample) == 2 and len(x8.upsample) == 3


def test_build_net_rebuilds_from_serialised_config() -> None:
    config = StyleNetConfig(norm="batch", upsample="transposed")
    restored = StyleNetConfig.model_validate_json(config.model_dump_json())
    net = build_net(restored)
    assert isinstance(net, StyleNet) and net.config == config


def test_style_net_output_depends_on_input() -> None:
    net = StyleNet(StyleNetConfig(base_channels=8, num_residual=1)).eval()
    with torch.no_grad():
        a, b = net(torch.rand(1, 3, 32, 32)), net(torch.rand(1, 3, 32, 32))
    assert not torch.allclose(a, b)


def test_multistyle_decoder_widths_follow_the_config() -> None:
    """A narrower decoder (the distilled net's) changes the upsampling convs' widths and keeps
    the output size exact; without ``decoder_channels`` the decoder mirrors the encoder."""
    mirrored = MultiStyleNet(MultiStyleNetConfig(num_styles=2, channels=(8, 16, 16)))
    assert [m.conv.conv.out_channels for m in mirrored.decoder] == [16, 8, 3]
    config = MultiStyleNetConfig(
        num_styles=2, channels=(8, 16, 16), outer_kernel=5, decoder_channels=(8, 4)
    )
    narrow = build_net(MultiStyleNetConfig.model_validate_json(config.model_dump_json()))
    assert isinstance(narrow, MultiStyleNet)
    assert [m.conv.conv.out_channels for m in narrow.decoder] == [8, 4, 3]
    assert count_parameters(narrow) < count_parameters(mirrored)
    with torch.no_grad():
        out = narrow(torch.rand(2, 3, 37, 29), torch.eye(2))
    assert out.shape == (2, 3, 37, 29)


def test_a_full_precision_head_runs_outside_autocast() -> None:
    """``full_precision_head`` layers compute in float32 under a bf16 autocast and the rest in
    bf16; with every layer in the head the output is exactly the float32 net's."""
    torch.manual_seed(0)
    net = MultiStyleNet(MultiStyleNetConfig(num_styles=2, channels=(8, 8, 8), num_residual=1))
    x, style = torch.rand(1, 3, 24, 20), torch.eye(2)[1:]
    dtypes: list[torch.dtype] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
        for layer in net.layers()
    ]
    with torch.no_grad():
        reference = net(x, style)
        net.full_precision_head = 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dtypes.clear()
            net(x, style)
            assert dtypes[0] == torch.float32 and set(dtypes[1:]) == {torch.bfloat16}
            net.full_precision_head = len(net.layers())
            precise = net(x, style)
            net.full_precision_head = 0
            rounded = net(x, style)
    for hook in hooks:
        hook.remove()
    assert torch.equal(precise, reference)
    assert not torch.equal(rounded.float(), reference)

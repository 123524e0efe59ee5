"""Transform nets: exact output sizes for any input, documented size, config round-trip."""

from __future__ import annotations

import pytest
import torch

from model_zoo.config import SRNetConfig, StyleNetConfig
from model_zoo.nets import SRNet, StyleNet, build_net, count_parameters


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
def test_sr_net_scales_exactly(factor: int, size: tuple[int, int]) -> None:
    net = SRNet(SRNetConfig(factor=factor, channels=8, num_residual=1)).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, size[0] * factor, size[1] * factor)


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

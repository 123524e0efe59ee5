"""The weights' exponential moving average (``--ema-decay``), for both training loops.

A run exports the average instead of its last step, which at small batches is noise around
where the run has got to. The average needs a run many times ``1 / (1 - decay)`` steps long: on
a 1,250-step fine-tune of ``x4`` at 0.999 it measured worse than both its start and its last
step (README, "Training a style"), having averaged in the start and Adam's restart.

The update is one fused ``foreach`` lerp plus a counter increment on the device, with no host
read, so the GPU loop's CUDA graph holds it like the optimizer step. The container is PyTorch's
``AveragedModel`` (its state, ``module.*`` and ``n_averaged``, is what checkpoints store under
``ema.``); its own ``update_parameters`` reads the counter on the host every step, which a
graph cannot capture.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class WeightAverage:
    """An exponential moving average of a net's weights and BN statistics. The statistics are
    averaged too: the averaged weights' activations are not the last step's, and a long
    average of the statistics is closer to theirs than the last few batches' are."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay must be in (0, 1), got {decay}")
        self.decay = decay
        # A deep copy; its counter on the net's device too (on the host, a captured graph
        # would count only its capture).
        device = next(net.parameters()).device
        self.model = AveragedModel(net, device=device, use_buffers=True)
        self._averaged = self._float_tensors(self.model.module)
        self._live = self._float_tensors(net)

    @staticmethod
    def _float_tensors(net: nn.Module) -> list[torch.Tensor]:
        """Parameters and floating buffers in a fixed order (integer counters are skipped)."""
        tensors = [p.detach() for p in net.parameters()]
        return tensors + [b for b in net.buffers() if b.is_floating_point()]

    @property
    def module(self) -> nn.Module:
        """The averaged net: what the run exports."""
        return self.model.module

    @property
    def updates(self) -> int:
        return int(self.model.n_averaged)

    def start_from(self, net: nn.Module) -> None:
        """Begin at ``net``'s current weights, unless a checkpoint's average was loaded (a run
        that turns the average on at a resume starts it at the resumed weights)."""
        if self.updates == 0:
            with torch.no_grad():
                torch._foreach_copy_(self._averaged, self._live)

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the net's current weights (after each optimizer step)."""
        torch._foreach_lerp_(self._averaged, self._live, 1.0 - self.decay)
        self.model.n_averaged.add_(1)


def exported(net: nn.Module, average: WeightAverage | None) -> nn.Module:
    """What a run exports (and its samples show): the average once it has been updated, else
    the net itself."""
    return net if average is None or not average.updates else average.module

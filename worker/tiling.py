"""Large images as overlapping tiles, so one forward pass never needs more than a tile's memory.

Why the result is seamless:

* **Exact context.** A conv net's output pixel depends only on inputs within its receptive-field
  radius ``r``. Neighbouring tiles overlap by ``O`` input pixels and each contributes only away
  from its cut edges: a tile's weight is 0 for the ``(O - F) / 2`` pixels next to an interior
  cut and ramps linearly to 1 over the next ``F`` pixels. With ``(O - F) / 2 >= r`` every
  pixel that is used was computed with its full context, so the tiled result equals the untiled
  one (``choose_feather`` picks ``F`` that way whenever ``O >= 2r``; with a smaller, user-set
  overlap the ramp spans half the overlap so any mismatch fades in instead of showing as a seam).
* **Aligned strides.** Tile origins are multiples of the net's total stride (4 for the style
  nets), so every tile samples the same downsampling grid as the whole image. The image is
  first padded to a multiple of the stride exactly as the net pads it (``pad_to_stride``).
* **Image-wide InstanceNorm.** Style nets normalise each image with its own statistics; a tile
  alone would get *its* statistics and a different colour cast per tile. The engine runs one
  statistics pass over the whole image (or, above ``TILE_STATS_SIZE``, a downscaled copy) and
  every tile of that image is normalised with those frozen statistics (``worker.ragged``), so
  tiles differ from the untiled result only where their context is cut - which the overlap
  above removes. SR nets use BatchNorm in eval (a fixed affine map) and need no statistics.

The two ramps at one cut sit at the same place and sum to one, and the weights are separable
(row weight x column weight), so contributions are simply added: no weight map is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_FEATHER = 8
"""Input pixels of linear blend added to ``2 r`` when the overlap is chosen automatically."""


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cover ``[0, length)`` with windows of ``tile`` that overlap by at least ``overlap``.

    ``length``, ``tile`` and ``overlap`` are multiples of the net's stride, so every start is
    too. The last window is moved back to end at ``length``; it then overlaps more.
    """
    if length <= tile:
        return [(0, length)]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return [(s, s + tile) for s in starts]


def choose_feather(overlap: int, radius: int) -> int:
    """Blend width: as wide as exactness allows, else half the overlap (see module docstring)."""
    if overlap - 2 * radius >= 1:
        return overlap - 2 * radius
    return overlap // 2


def auto_overlap(radius: int, stride: int) -> int:
    """The smallest stride-aligned overlap that makes tiles exact, plus a blend band."""
    return _round_up(2 * radius + DEFAULT_FEATHER, stride)


def _raw_weights(
    windows: list[tuple[int, int]], index: int, scale: int, feather: int
) -> torch.Tensor:
    start, end = windows[index]
    positions = torch.arange(start * scale, end * scale, dtype=torch.float32) + 0.5
    weight = torch.ones_like(positions)
    ramp = feather * scale
    if index > 0:
        cut = (windows[index - 1][1] + start) / 2 * scale
        if ramp:
            weight *= ((positions - (cut - ramp / 2)) / ramp).clamp(0, 1)
        else:
            weight *= (positions >= cut).float()
    if index < len(windows) - 1:
        cut = (end + windows[index + 1][0]) / 2 * scale
        if ramp:
            weight *= (((cut + ramp / 2) - positions) / ramp).clamp(0, 1)
        else:
            weight *= (positions < cut).float()
    return weight


def axis_weights(windows: list[tuple[int, int]], scale: int, feather: int) -> list[torch.Tensor]:
    """Blend weight of each window along one axis, per *output* pixel (input x ``scale``).

    Normalised so that the windows sum to one at every pixel. With the usual geometry the
    ramps already do (only neighbours overlap); the division matters when a small tile forces
    windows to overlap their neighbours' neighbours too. A 2-D tile weight is the product of
    its row and column weights, so 2-D sums are one as well.
    """
    raw = [_raw_weights(windows, i, scale, feather) for i in range(len(windows))]
    total = torch.zeros(windows[-1][1] * scale)
    for (start, end), weight in zip(windows, raw, strict=True):
        total[start * scale : end * scale] += weight
    return [
        weight / total[start * scale : end * scale]
        for (start, end), weight in zip(windows, raw, strict=True)
    ]


@dataclass(frozen=True)
class Tile:
    """One window of a tiled image, in input pixels of the stride-padded image."""

    row: int
    col: int
    top: int
    bottom: int
    left: int
    right: int


@dataclass
class TilePlan:
    """The tiles of one image and how to blend them back."""

    height: int
    width: int
    rows: list[tuple[int, int]]
    cols: list[tuple[int, int]]
    feather: int

    @property
    def tiles(self) -> list[Tile]:
        return [
            Tile(r, c, top, bottom, left, right)
            for r, (top, bottom) in enumerate(self.rows)
            for c, (left, right) in enumerate(self.cols)
        ]

    @property
    def is_tiled(self) -> bool:
        return len(self.rows) * len(self.cols) > 1


def plan_tiles(
    height: int, width: int, *, tile: int, overlap: int, radius: int, stride: int
) -> TilePlan:
    """Tiles for a ``height`` x ``width`` image (both multiples of ``stride``).

    ``tile`` and ``overlap`` are rounded to the stride (down and up); the overlap is capped so
    that tiles still advance.
    """
    tile = max(stride, tile // stride * stride)
    overlap = min(_round_up(max(overlap, 0), stride), tile - stride)
    rows = spans(height, tile, overlap)
    cols = spans(width, tile, overlap)
    return TilePlan(height, width, rows, cols, choose_feather(overlap, radius))


class TileAccumulator:
    """Sums weighted tile outputs into one float image (3 x H*scale x W*scale)."""

    def __init__(self, plan: TilePlan, scale: int) -> None:
        self.plan = plan
        self.scale = scale
        self.image = torch.zeros(3, plan.height * scale, plan.width * scale)
        self.row_weights = axis_weights(plan.rows, scale, plan.feather)
        self.col_weights = axis_weights(plan.cols, scale, plan.feather)

    def add(self, tile: Tile, output: torch.Tensor) -> None:
        """``output``: 3 x tile_h*scale x tile_w*scale, any float dtype and device."""
        wy, wx = self.row_weights[tile.row], self.col_weights[tile.col]
        s = self.scale
        region = self.image[:, tile.top * s : tile.bottom * s, tile.left * s : tile.right * s]
        region.add_(output.float().cpu() * wy[:, None] * wx[None, :])

"""From what a user asks for (a style, or a mix of styles) to what a worker runs.

Torch-free: the API resolves names and validates mixes here before anything is queued, and
the worker turns the result into the net's per-sample style weights
(:meth:`StyleChoice.weights_row`).

* A style name is either a single-style net or a public slot of a multi-style net
  (``Manifest.styles``).
* ``mix=mosaic:0.7,candy:0.3`` is a convex combination of the conditional parameters of styles
  of one multi-style net (Dumoulin et al.): the weights must be non-negative and not all zero,
  and are normalised to sum to 1.
* ``strength`` s < 1 mixes the net's identity slot in: ``s * style + (1 - s) * identity`` in
  the conditional parameters. A net without an identity slot (the single-style nets) blends
  the output with the photo instead (``pixel_blend``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model_zoo.manifest import Manifest, StyleRef

MAX_MIX_STYLES = 8


class UnknownStyleError(LookupError):
    """No style of that name: the caller gets the list of the available ones."""

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(f"no style named {name!r}; available: {', '.join(available) or 'none'}")
        self.name, self.available = name, available


class StyleMixError(ValueError):
    """A mix that cannot be run (malformed, negative weights, styles of different nets)."""


@dataclass(frozen=True)
class StyleChoice:
    """A resolved request: which zoo model runs, with which slot weights."""

    model: str
    slots: tuple[tuple[int, float], ...] = ()
    """(slot index, weight) pairs summing to 1; empty for a single-style net."""
    identity: int | None = None
    """The net's identity slot, which ``strength`` < 1 mixes in."""
    styles: tuple[str, ...] = ()
    """The public names behind the choice, for logs and metrics."""

    def weights_row(self, num_styles: int, strength: float = 1.0) -> list[float]:
        """The conditional net's style-weight row for this choice at ``strength``."""
        # Without an identity slot the worker blends pixels instead (``pixel_blend``) and the
        # row stays the styles' own convex combination.
        share = strength if self.identity is not None else 1.0
        row = [0.0] * num_styles
        for index, weight in self.slots:
            row[index] += share * weight
        if self.identity is not None:
            row[self.identity] += 1.0 - strength
        return row

    def pixel_blend(self, strength: float) -> bool:
        """Whether ``strength`` must be applied by blending the output with the photo."""
        return strength < 1.0 and self.identity is None


def parse_mix(text: str) -> list[tuple[str, float]]:
    """``"mosaic:0.7,candy:0.3"`` -> [("mosaic", 0.7), ("candy", 0.3)]; a bare name weighs 1."""
    items: list[tuple[str, float]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition(":")
        name = name.strip()
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise StyleMixError(f"mix: {part!r} is not NAME:WEIGHT with a number") from None
        if not name:
            raise StyleMixError(f"mix: {part!r} has no style name")
        if not math.isfinite(weight) or weight < 0:
            raise StyleMixError(f"mix: the weight of {name!r} must be a number >= 0")
        items.append((name, weight))
    if not items:
        raise StyleMixError("mix: give at least one NAME:WEIGHT, e.g. mosaic:0.7,candy:0.3")
    if len(items) > MAX_MIX_STYLES:
        raise StyleMixError(f"mix: at most {MAX_MIX_STYLES} styles")
    if sum(weight for _, weight in items) <= 0:
        raise StyleMixError("mix: the weights must not all be zero")
    return items


def resolve_style(manifest: Manifest, style: str | None, mix: str | None) -> StyleChoice:
    """The model and slot weights for ``style`` or ``mix`` (exactly one of them)."""
    if (style is None) == (mix is None):
        raise StyleMixError("give either style=NAME or mix=NAME:WEIGHT,..., not both or neither")
    known = manifest.styles()
    if style is not None:
        return _choice(_lookup(known, style), [(style, 1.0)], known)
    assert mix is not None
    items = parse_mix(mix)
    refs = [_lookup(known, name) for name, _ in items]
    if len({ref.model for ref in refs}) > 1:
        raise StyleMixError(
            "mix: these styles live in different nets ("
            + ", ".join(f"{ref.style} in {ref.model}" for ref in refs)
            + "); only styles of one multi-style net can be mixed"
        )
    if len(items) > 1 and refs[0].index is None:
        raise StyleMixError(f"mix: {refs[0].model} is a single-style net; it cannot mix styles")
    return _choice(refs[0], items, known)


def _lookup(known: dict[str, StyleRef], name: str) -> StyleRef:
    try:
        return known[name]
    except KeyError:
        raise UnknownStyleError(name, sorted(known)) from None


def _choice(
    ref: StyleRef, items: list[tuple[str, float]], known: dict[str, StyleRef]
) -> StyleChoice:
    if ref.index is None:
        return StyleChoice(model=ref.model, styles=(ref.style,))
    # Scaled by the largest weight before summing: finite weights such as 1e308 overflow a sum
    # to inf, which made every share 0 (a grey picture) instead of an even mix.
    largest = max(weight for _, weight in items)
    total = sum(weight / largest for _, weight in items)
    slots: dict[int, float] = {}
    for name, weight in items:
        index = known[name].index
        assert index is not None
        slots[index] = slots.get(index, 0.0) + weight / largest / total
    return StyleChoice(
        model=ref.model,
        slots=tuple(sorted(slots.items())),
        identity=ref.identity,
        styles=tuple(name for name, _ in items),
    )

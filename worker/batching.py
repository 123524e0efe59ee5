"""Dynamic batching: when to stop collecting jobs, and which work shares a forward pass.

**Collecting** (``collect``): block for the first job, then poll without blocking until
``max_batch`` jobs are in hand or ``max_wait_ms`` has passed since the first one arrived. An idle
worker therefore answers a lone request after about ``max_wait_ms``, a busy one fills batches.
(Not a short blocking read: Redis ends those on its 100 ms timer tick, see ``collect``.)

**Packing** (``pack``): the engine turns each job into work units - the whole image, or its
tiles plus (for InstanceNorm nets) one statistics pass - and ``pack`` groups the units of one
model into forward passes. Units need not have the same size: ``worker.ragged`` runs a padded
batch *exactly* as each image alone (per-sample reflection padding and InstanceNorm over each
sample's own region), so mixed sizes share a pass instead of collapsing to batch size 1. What
padding costs is compute on filler pixels, so a unit joins a group only while the filler stays
below ``max_pad_fraction`` of the group's canvas, and a group stays under ``max_units`` units and
``max_pixels`` output pixels (the memory bound of one pass; a single unit may exceed it, since it
has to run anyway). Equal sizes - the common case for tiles - pack with no filler at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


def collect(
    read: Callable[[int, int | None], list[T]],
    *,
    max_batch: int,
    max_wait_ms: int,
    block_ms: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[T]:
    """Gather up to ``max_batch`` items. ``read(count, block_ms)`` returns at most ``count``
    items; ``block_ms`` >= 1 waits that long for the first, ``None`` returns at once.

    Only the first read blocks (up to ``block_ms``; [] if nothing came). The rest of the
    ``max_wait_ms`` window is polled with non-blocking reads every ``poll_interval_ms``: Redis
    checks blocked-client timeouts on its timer tick (every 100 ms at the default ``hz 10``),
    so a short ``BLOCK`` would hold the batch for ~100 ms instead of ``max_wait_ms``. Stops
    early (keeping what it has) when the batch is full or ``should_stop()`` turns true."""
    items = read(max_batch, max(1, block_ms))
    if not items:
        return []
    return fill(items, read, max_batch=max_batch, max_wait_ms=max_wait_ms, should_stop=should_stop)


def fill(
    items: list[T],
    read: Callable[[int, int | None], list[T]],
    *,
    max_batch: int,
    max_wait_ms: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[T]:
    """The window of ``collect`` after its first read: poll without blocking until
    ``max_batch`` items are in hand or ``max_wait_ms`` has passed (for callers that got their
    first items from a non-blocking read)."""
    deadline = time.monotonic() + max_wait_ms / 1000
    interval = poll_interval_ms(max_wait_ms) / 1000
    while len(items) < max_batch and not should_stop():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
        items.extend(read(max_batch - len(items), None))
    return items


def poll_interval_ms(max_wait_ms: int) -> float:
    """A tenth of the window, clamped to 1-20 ms. A batch that fills up is noticed within one
    interval (the last sleep is cut to the deadline, so the window itself ends on time); a
    non-blocking XREADGROUP costs tens of microseconds, and the 20 ms cap keeps a long window
    (tests hold jobs for a minute) at 50 reads a second rather than thousands."""
    return min(max(max_wait_ms / 10, 1.0), 20.0)


@dataclass
class Group:
    """Indices of units that run as one forward pass on a ``height`` x ``width`` canvas."""

    members: list[int] = field(default_factory=list)
    height: int = 0
    width: int = 0
    area: int = 0
    """Sum of the members' own areas (input pixels)."""


def pack(
    sizes: Sequence[tuple[int, int]],
    *,
    max_units: int,
    max_pixels: int,
    max_pad_fraction: float,
    scale: int = 1,
) -> list[Group]:
    """First-fit decreasing: sort units by area, put each in the first group it fits.

    ``sizes`` are input (height, width); ``scale`` converts to output pixels for ``max_pixels``.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0] * sizes[i][1], sizes[i]))
    groups: list[Group] = []
    for i in order:
        h, w = sizes[i]
        for group in groups:
            if len(group.members) >= max_units:
                continue
            ch, cw = max(group.height, h), max(group.width, w)
            canvas = ch * cw * (len(group.members) + 1)
            if canvas * scale * scale > max_pixels:
                continue
            if canvas - (group.area + h * w) > max_pad_fraction * canvas:
                continue
            group.members.append(i)
            group.height, group.width, group.area = ch, cw, group.area + h * w
            break
        else:
            groups.append(Group([i], h, w, h * w))
    return groups

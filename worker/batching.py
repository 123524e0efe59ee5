"""Dynamic batching: when to stop collecting jobs, and which work shares a forward pass.

**Collecting** (``fill``): the worker blocks for the first job, then polls without blocking until
``max_batch`` jobs are in hand or ``max_wait_ms`` has passed since the first one arrived. (Not a
short blocking read: Redis ends those on its 100 ms timer tick, see ``fill``.)

**Whether to wait at all** (``BatchWindow``): the window only pays when a batch-mate is likely to
arrive inside it. A lone caller (c=1, or sparse traffic) never gets one, and waiting
``max_wait_ms`` for nobody is pure latency: 10 ms on a ~100 ms CPU request, several times the
forward pass on a GPU. ``adaptive`` therefore closes the window after it has caught nothing
twice in a row and keeps it closed (jobs already queued are still taken in one read) until a
read finds a backlog or a periodic probe window catches a batch-mate; ``fixed`` always waits.

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
from typing import Literal, TypeVar

T = TypeVar("T")


def fill(
    items: list[T],
    read: Callable[[int, int | None], list[T]],
    *,
    max_batch: int,
    max_wait_ms: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[T]:
    """The batch window after the first read (the worker blocks for that one, up to
    ``BLOCK_MS``): poll without blocking every ``poll_interval_ms`` until ``max_batch`` items
    are in hand, ``max_wait_ms`` has passed or ``should_stop()`` turns true, keeping what it
    has. ``read(count, block_ms)`` returns at most ``count`` items; ``None`` returns at once.
    Redis checks blocked-client timeouts on its timer tick (every 100 ms at the default
    ``hz 10``), so a short ``BLOCK`` would hold the batch for ~100 ms instead of
    ``max_wait_ms``."""
    deadline = time.monotonic() + max_wait_ms / 1000
    interval = poll_interval_ms(max_wait_ms) / 1000
    while len(items) < max_batch and not should_stop():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
        items.extend(read(max_batch - len(items), None))
    return items


WindowMode = Literal["adaptive", "fixed"]
WindowOutcome = Literal["caught", "fruitless", "skipped", "backlog"]


@dataclass
class BatchWindow:
    """Decides per batch whether to wait for batch-mates, from what recent windows caught.

    Evidence of concurrent callers is what a wait needs: a first read that found more than one
    job (a backlog), or a window that caught one. ``fruitless_to_close`` windows in a row that
    caught nothing close it; while closed, every ``probe_every``-th batch still waits (a probe),
    so a caller that turns concurrent is noticed within that many batches even when it never
    builds a backlog. A closed window costs a lone caller ``max_wait_ms / probe_every`` on
    average instead of ``max_wait_ms``."""

    mode: WindowMode = "adaptive"
    fruitless_to_close: int = 2
    probe_every: int = 8
    fruitless: int = 0
    """Windows in a row (probes included) that caught nothing since the last evidence."""
    skipped: int = 0
    """Batches since the window closed or was last probed."""

    def wait_ms(self, in_hand: int, *, max_batch: int, max_wait_ms: int) -> int:
        """How long to wait for batch-mates of the ``in_hand`` jobs the first read returned."""
        if in_hand >= max_batch:
            return 0  # nothing to wait for
        if self.mode == "fixed" or in_hand > 1:
            return max_wait_ms
        if self.fruitless < self.fruitless_to_close or self.skipped + 1 >= self.probe_every:
            return max_wait_ms
        return 0

    def record(self, in_hand: int, caught: int, waited_ms: int) -> WindowOutcome:
        """What the batch's window did: ``in_hand`` jobs from the first read, ``caught`` more
        during a ``waited_ms`` window. Returns the outcome (for the worker's metrics)."""
        if in_hand > 1:
            self.fruitless = self.skipped = 0
            return "backlog"
        if caught:
            self.fruitless = self.skipped = 0
            return "caught"
        if waited_ms <= 0:
            self.skipped += 1
            return "skipped"
        self.fruitless += 1
        self.skipped = 0
        return "fruitless"


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

"""What a job costs on this worker: seconds of compute per output megapixel, per model.

The API admits, refuses or lanes a job by its estimated compute time (output pixels x this
cost), so the number must be measured where the work happens, on the worker's own device and
load: once at start-up with a forward pass at a representative size (``probe``), then refined
from every batch big enough to be dominated by the forward passes rather than fixed overhead
(an exponential average, so a machine that becomes busier is noticed within a few jobs).
Images the worker tiles are measured and averaged apart
(``ModelCost.tiled_seconds_per_megapixel``): on a CPU their cost per pixel is several times the
whole-image one. Published to Redis by the heartbeat (``jobqueue.consumer.Consumer.publish_costs``).

The probes are most of a CPU worker's start-up (on a 2-core CPU ~17 s per SR net, ~72 of ~77 s
before it serves), and a worker that joins a running deployment on the same hardware would
measure what is already published. So each figure carries a :func:`fingerprint` of what it
holds for, and a starting worker adopts a published figure with its own fingerprint instead of
probing (``CostTracker.adopt``); its batches go on refining it as they would a probe's.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time

import numpy as np

from jobqueue.protocol import ModelCost
from model_zoo.hardware import hardware_description
from worker.engine import Engine

SMOOTHING = 0.3
"""Weight of a new measurement in the average."""
MIN_MEASURED_PIXELS = 256 * 256
"""Batches with fewer output pixels than this do not update the cost: per-pass overhead would
dominate and inflate it."""


def _averaged(average: float, samples: int, measured: float, probe: bool) -> float:
    """The average after ``measured``: a probe or a first sample replaces it (a stand-in or a
    stale figure must not linger), later samples move it by ``SMOOTHING``."""
    if probe or samples == 0:
        return measured
    return average + SMOOTHING * (measured - average)


class CostTracker:
    def __init__(self, worker_id: str, device: str) -> None:
        self.worker_id = worker_id
        self.device = device
        self._costs: dict[str, ModelCost] = {}
        self._lock = threading.Lock()
        self._changed = False

    def record(
        self,
        model: str,
        seconds: float,
        output_pixels: int,
        *,
        probe: bool = False,
        tiled: bool = False,
        tiling: tuple[int, int] | None = None,
        fingerprint: str | None = None,
    ) -> None:
        """A measurement: ``seconds`` of compute for ``output_pixels`` of ``model``'s output,
        of tiled images when ``tiled``. ``tiling`` is the engine's rule (``Engine.tiling``),
        ``fingerprint`` what the figure holds for (:func:`fingerprint`)."""
        if output_pixels <= 0 or seconds <= 0:
            return
        if not probe and output_pixels < MIN_MEASURED_PIXELS:
            return
        per_mpx = seconds / (output_pixels / 1e6)
        with self._lock:
            current = self._costs.get(model)
            if current is None:
                # A first figure of either kind stands in for the other until it is measured.
                current = self._costs[model] = ModelCost(
                    model, per_mpx, 0, self.worker_id, self.device, time.time()
                )
            if tiling is not None:
                current.tile_input_side, current.whole_max_pixels = tiling
            if fingerprint is not None:
                current.fingerprint = fingerprint
            if tiled:
                current.tiled_seconds_per_megapixel = _averaged(
                    current.tiled_seconds_per_megapixel, current.tiled_samples, per_mpx, probe
                )
                current.tiled_samples += 1
            else:
                current.seconds_per_megapixel = _averaged(
                    current.seconds_per_megapixel, current.samples, per_mpx, probe
                )
                current.samples += 1
            current.updated_at = time.time()
            self._changed = True

    def adopt(self, cost: ModelCost) -> None:
        """Take another worker's figure as this worker's own (same fingerprint): its sample
        counts come along, so this worker's batches refine it rather than replace it."""
        with self._lock:
            self._costs[cost.model] = ModelCost(
                **vars(cost) | {"worker": self.worker_id, "device": self.device}
            )
            self._changed = True

    def get(self, model: str) -> ModelCost | None:
        with self._lock:
            return self._costs.get(model)

    def all(self) -> list[ModelCost]:
        with self._lock:
            return list(self._costs.values())

    def take_changes(self) -> list[ModelCost]:
        """Everything, if anything changed since the last call (what the heartbeat publishes)."""
        with self._lock:
            if not self._changed:
                return []
            self._changed = False
            return [ModelCost(**vars(cost)) for cost in self._costs.values()]


def probe(engine: Engine, name: str, side: int, *, tiled: bool = False) -> tuple[float, int]:
    """Time one run of ``name`` producing about ``side`` x ``side`` pixels, after an untimed
    one (allocations, kernel choice), as tiles if ``tiled``. Returns (seconds, output pixels)."""
    model = engine.model(name)
    input_side = max(16, side // model.factor)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (input_side, input_side, 3), dtype=np.uint8)
    with engine.forced_tiles() if tiled else contextlib.nullcontext():
        engine.run([(name, pixels)])
        started = time.perf_counter()
        (output,) = engine.run([(name, pixels)])
        seconds = time.perf_counter() - started
    return seconds, int(output.pixels.shape[0] * output.pixels.shape[1])


def tiled_probe_side(engine: Engine, name: str, scale: float) -> int:
    """The output side of the tiled probe: ``scale`` x the tile size, so the probe runs several
    tiles and their statistics pass (0: ``name`` is never tiled)."""
    threshold, _ = engine.tiling(name)
    if threshold == 0 or scale <= 1:
        return 0
    return int(threshold * scale) * engine.model(name).factor


def fingerprint(engine: Engine, name: str) -> str:
    """What ``name``'s cost figure depends on: its weights, the runtime, precision and float32
    head the engine chose for them, the tiling rule and pixels per pass, and the hardware with
    its thread count. Two workers that agree on all of it measure the same figure."""
    model = engine.model(name)
    parts = (
        model.entry.sha256,
        model.runtime,
        model.precision,
        model.full_precision_head,
        engine.tiling(name),
        engine.max_batch_pixels,
        hardware_description(engine.device),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

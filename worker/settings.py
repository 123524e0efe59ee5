"""Worker settings, read from the environment (or a ``.env`` file); names have no prefix.

The settings the API shares (``REDIS_URL``, ``QUEUE_PREFIX``, ``MODEL_ZOO_DIR``, ``RESULT_TTL_S``,
``HEARTBEAT_INTERVAL_S``, ``CLAIM_IDLE_MS``, ``LOG_LEVEL``, ``LOG_FORMAT``) and their validation
come from ``jobqueue.settings.QueueSettings``.

==========================  =================  ============================================
Variable                    Default            Meaning
==========================  =================  ============================================
``REDIS_URL``               redis://localhost  Redis holding the job stream and results.
                            :6379/0
``QUEUE_PREFIX``            imgsvc             Key prefix; must match the API's.
``MODEL_ZOO_DIR``           (package folder)   Zoo folder with ``manifest.json`` + weights.
``WORKER_MODELS``           (all)              Comma list of models (or styles: their net)
                                               to load and warm up at start; other zoo
                                               models load on first use.
``MAX_BATCH``               8                  Most jobs taken per batch; also the most
                                               images / tiles in one forward pass.
``MAX_WAIT_MS``             10                 How long to wait for more jobs after the
                                               first before computing.
``BATCH_WINDOW``            adaptive           adaptive | fixed. fixed: every batch waits
                                               MAX_WAIT_MS; adaptive: stops waiting after
                                               two windows caught nothing, until a backlog
                                               or a probe (every 8th batch) shows
                                               concurrent callers (``worker.batching``).
``BATCH_WINDOW_CLOSE_AFTER`` 2                 adaptive: fruitless windows in a row that
                                               close the window.
``BATCH_WINDOW_PROBE_EVERY`` 8                 adaptive: while closed, every this-many-th
                                               batch waits anyway; a lone caller pays
                                               MAX_WAIT_MS / this on average (1: never close).
``MAX_BATCH_PIXELS``        auto               Most output pixels in one forward pass (a
                                               single image or tile may exceed it). auto =
                                               65536 (256²) on CPU, 16777216 (4096²) on
                                               CUDA; see below.
``MAX_PAD_FRACTION``        0.25               Most filler allowed when images of different
                                               sizes share a padded forward pass.
``DEVICE``                  auto               auto (CUDA if present, else CPU) | cpu | cuda.
``PRECISION``               auto               auto | fp32 | bf16 | fp16. auto = bf16 on CPUs
                                               with native bf16 (else fp32), fp16 on CUDA.
``TORCH_THREADS``           0                  CPU threads for torch; 0 = torch's default.
``TILE_SIZE``               1024               Largest tile side, in output pixels; larger
                                               images are tiled.
``TILE_OVERLAP``            auto               Overlap of neighbouring tiles in output
                                               pixels; auto = 2 x receptive radius + 8
                                               (exact).
``TILE_STATS_SIZE``         1024               InstanceNorm statistics of a tiled image come
                                               from a copy downscaled to at most this side
                                               (input pixels; exact when not downscaled).
``WHOLE_MAX_PIXELS``        auto               An image above TILE_SIZE still runs whole if it
                                               has at most this many pixels, where whole
                                               images have a runtime of their own (OpenVINO
                                               on a CPU); auto = 2048²; 0 = always tile.
``ENCODE_THREADS``          0                  Threads encoding a batch's results at once
                                               (zlib and libjpeg release the GIL); 0 =
                                               min(8, cores this process may use); set it
                                               to the CPU request in a container.
``PNG_COMPRESS_LEVEL``      1                  zlib level 0-9 for PNG results.
``JPEG_QUALITY``            90                 Quality of JPEG results.
``WEBP_QUALITY``            90                 Quality of WebP results.
``CLAIM_IDLE_MS``           30000              A job pending this long on a consumer that
                                               stopped refreshing it is taken over; at
                                               least 2 x HEARTBEAT_INTERVAL_S.
``MAX_DELIVERIES``          3                  Deliveries after which a job is dead-lettered
                                               (its caller gets a 503).
``HEARTBEAT_INTERVAL_S``    2.0                Heartbeat period; the key lives 3 periods.
``RESULT_TTL_S``            600                Lifetime of result, done and status keys.
``WORKER_ID``               host-pid           Consumer name and heartbeat key suffix.
``STOP_CHECK_INTERVAL_S``   0.2                How often, between forward passes, running
                                               jobs' cancel markers are read.
``COST_PROBE_SIDE``         256                Output side of the warm-up pass that
                                               measures a model's seconds per megapixel.
``COST_PROBE_TILED_SCALE``  1.25               The same for tiled images: an input this many
                                               times the tiling threshold; 0 = learn it from
                                               jobs only.
``METRICS_PORT``            9100               Prometheus endpoint of the worker; 0 = none.
``METRICS_HOST``            127.0.0.1          Its interface (0.0.0.0 in a container).
``LOG_LEVEL``               INFO               Python logging level.
``LOG_FORMAT``              json               json | text.
==========================  =================  ============================================

**Why MAX_BATCH_PIXELS depends on the device.** Jobs are always *collected* in batches (one
XREADGROUP, one results MULTI/EXEC for up to ``MAX_BATCH`` jobs); this setting decides how many
of them share one *forward pass*. On a GPU a bigger pass fills the device, so the bound is only
memory: 4096² output pixels (8 tiles of 1024², or 64 images of 512²). On a CPU one image
already keeps the cores busy and a bigger pass only pushes the activations out of cache: the
per-image time of the full-size style net (``StyleNetConfig()``, bf16, through
``Engine.run``) *rises* with the pixels per pass. Measured 2026-11 on the shared 2-vCPU
AVX-512-BF16 dev machine, 1 torch thread, all configurations interleaved (two runs of 6 and 8
rounds, median ms per image; x = against batch 1 of the same size):

==========  =====  ===============  ==============  =======================
image       batch  px per pass      ms / image      x
==========  =====  ===============  ==============  =======================
256 px      1      65536            88 / 78         1
256 px      2      131072           106 / 98        1.20 / 1.26
256 px      4      262144           134 / 142       1.53 / 1.82
512 px      1      262144           556 / 571       1
512 px      2      524288           670 / 708       1.20 / 1.24
128 px      1      16384            25 / 19         1
128 px      4      65536            23 / 23         0.90 / 1.21
==========  =====  ===============  ==============  =======================

So the CPU budget is the largest that does not raise per-image time: 65536 (one 256² image;
small images still share a pass up to that, where the effect is within the noise). With the
default 2 threads the same machine shows the same ordering whenever the competing training job
leaves both cores free (256 px batch 2: x1.06 median, x1.34 best-of); when it does not, every
thread barrier stalls and batching only amortises the stalls - a property of the oversubscribed
machine, not of the net.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from jobqueue.settings import QueueSettings

#: ``MAX_BATCH_PIXELS=auto`` on CPU: one 256² image per pass (see the module docstring).
CPU_AUTO_BATCH_PIXELS = 256 * 256
#: ``MAX_BATCH_PIXELS=auto`` on CUDA: a memory bound, not a speed one.
CUDA_AUTO_BATCH_PIXELS = 4096 * 4096


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(QueueSettings):
    worker_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_batch: int = Field(8, ge=1, le=256)
    max_wait_ms: int = Field(10, ge=0, le=60_000)
    batch_window: Literal["adaptive", "fixed"] = "adaptive"
    batch_window_close_after: int = Field(2, ge=1, le=1000)
    batch_window_probe_every: int = Field(8, ge=1, le=1000)
    max_batch_pixels: int | Literal["auto"] = "auto"
    max_pad_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    min_psnr_db: float = Field(40.0, ge=0.0)
    cpu_runtime: Literal["auto", "torch", "openvino"] = "auto"
    torch_threads: int = Field(0, ge=0)
    tile_size: int = Field(1024, ge=32)
    tile_overlap: int | Literal["auto"] = "auto"
    tile_stats_size: int = Field(1024, ge=32)
    whole_max_pixels: int | Literal["auto"] = "auto"
    encode_threads: int = Field(0, ge=0, le=64)
    png_compress_level: int = Field(1, ge=0, le=9)
    jpeg_quality: int = Field(90, ge=1, le=100)
    webp_quality: int = Field(90, ge=1, le=100)
    max_deliveries: int = Field(3, ge=1)
    worker_id: str = Field(default_factory=_default_worker_id, pattern=r"^[A-Za-z0-9_.:\-]+$")
    stop_check_interval_s: float = Field(0.2, gt=0, le=10)
    cost_probe_side: int = Field(256, ge=32, le=4096)
    cost_probe_tiled_scale: float = Field(1.25, ge=0, le=8)
    """The tiled probe's input side as a multiple of the tiling threshold (0: learn the tiled
    cost from jobs only; on a 2-core CPU the default probe takes ~7 s per style or SR net)."""
    cost_probe_reuse: bool = True
    """Adopt a cost another worker published for the same weights, runtime and hardware
    instead of probing (``worker.costs``): a worker joining a deployment serves ~70 s sooner on
    a 2-core CPU. False: always probe."""
    cost_probe_wait_s: float = Field(120.0, ge=0, le=3600)
    """With reuse on, workers that start together do not all probe: one claims each model (a
    Redis key with this TTL) and the others wait up to this long for its figure, then probe
    themselves. Several probes at once on shared cores would also inflate every figure."""
    metrics_port: int = Field(9100, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @field_validator("worker_models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("tile_overlap", "max_batch_pixels", "whole_max_pixels", mode="before")
    @classmethod
    def _int_or_auto(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() != "auto":
            return int(value)
        return value.strip().lower() if isinstance(value, str) else value

    def resolved_encode_threads(self) -> int:
        """``ENCODE_THREADS``, with 0 resolved: a GPU worker's batch of 32 results would
        otherwise be encoded one after another on one core, longer than its forward pass."""
        if self.encode_threads:
            return self.encode_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return min(8, cores or 1)

    @model_validator(mode="after")
    def _worker_values(self) -> WorkerSettings:
        if isinstance(self.tile_overlap, int) and self.tile_overlap < 0:
            raise ValueError("TILE_OVERLAP must be >= 0 or 'auto'")
        if isinstance(self.max_batch_pixels, int) and self.max_batch_pixels < 1:
            raise ValueError("MAX_BATCH_PIXELS must be >= 1 or 'auto'")
        if isinstance(self.whole_max_pixels, int) and self.whole_max_pixels < 0:
            raise ValueError("WHOLE_MAX_PIXELS must be >= 0 or 'auto'")
        return self

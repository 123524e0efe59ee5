"""HTTP load generator: closed-loop concurrency sweeps and open-loop constant arrival rate.

Closed loop (what perf_analyzer and k6's "vus" do): N callers each send a request, wait for the
answer, send the next. It measures the latency/throughput curve of a service at a given number of
concurrent callers, and it can never overload the server by more than N requests.

Open loop (Poisson or constant arrivals, what real traffic looks like): requests are sent on a
schedule whatever the answers do, so queueing delay shows up in the latency instead of being
hidden by callers waiting (coordinated omission).

Every run is bounded twice: by a request count and by a wall-clock budget; after the budget no
new request is sent and the ones in flight finish within the client timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import httpx

from bench.images import Size, synthetic_png
from bench.servertiming import histogram_delta, parse_prometheus, parse_server_timing
from bench.stats import mean_or_nan, summarize

Endpoint = Literal["stylize", "upscale"]
Upload = Literal["multipart", "raw"]

TIMEOUT_STATUS = "timeout"
CONNECT_STATUS = "connect_error"
OTHER_STATUS = "client_error"
DROPPED_STATUS = "dropped"


@dataclass(frozen=True)
class Workload:
    """What each request asks for. With several sizes each request picks one at random (seeded),
    which is the mixed-size workload; with one size every request is identical."""

    endpoint: Endpoint = "stylize"
    style: str = "mosaic"
    factor: int = 4
    sizes: tuple[Size, ...] = ((256, 256),)
    output_format: str | None = None
    upload: Upload = "multipart"
    seed: int = 0

    @property
    def mixed(self) -> bool:
        return len(set(self.sizes)) > 1

    @property
    def label(self) -> str:
        what = (
            f"stylize style={self.style}"
            if self.endpoint == "stylize"
            else (f"upscale x{self.factor}")
        )
        sizes = ",".join(f"{w}x{h}" for w, h in self.sizes)
        return f"{what} {'mixed ' if self.mixed else ''}{sizes}"

    def params(self) -> dict[str, str]:
        params = (
            {"style": self.style} if self.endpoint == "stylize" else {"factor": str(self.factor)}
        )
        if self.output_format:
            params["format"] = self.output_format
        return params

    def payloads(self) -> dict[Size, bytes]:
        return {size: synthetic_png(*size, seed=self.seed + i) for i, size in enumerate(self.sizes)}


@dataclass
class Sample:
    """One request. ``status`` is the HTTP status, or one of the client-side failure names."""

    start_s: float
    latency_s: float
    status: int | str
    size: Size
    bytes_out: int = 0
    server: dict[str, float] = field(default_factory=dict)
    retry_after: str | None = None
    out_size: Size | None = None
    """Width x height of a PNG answer (read from its header, not decoded)."""

    @property
    def ok(self) -> bool:
        return self.status == 200


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> Size | None:
    """(width, height) from a PNG's IHDR chunk; None for anything else."""
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@dataclass
class LevelResult:
    """All samples of one concurrency level (closed loop) or one arrival rate (open loop)."""

    mode: Literal["closed", "open"]
    workload: str
    concurrency: int | None = None
    rate: float | None = None
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    metrics_batch: tuple[float, float] | None = None  # (sum, count) of batch-size histograms
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.ok]
        errors = Counter(str(s.status) for s in self.samples if not s.ok)
        lat_ms = [s.latency_s * 1000.0 for s in ok]
        out: dict[str, Any] = {
            "mode": self.mode,
            "workload": self.workload,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "requests": len(self.samples),
            "ok": len(ok),
            "errors": dict(sorted(errors.items())),
            # How fast a refusal comes: a 503 in milliseconds and a 504 after the whole
            # timeout are both errors, but only one leaves the caller waiting.
            "error_p50_ms": {
                status: summarize(
                    x.latency_s * 1000.0 for x in self.samples if str(x.status) == status
                )["p50"]
                for status in sorted(errors)
            },
            "error_rate": (len(self.samples) - len(ok)) / len(self.samples)
            if self.samples
            else 0.0,
            "wall_s": self.wall_s,
            "images_per_s": len(ok) / self.wall_s if self.wall_s > 0 else math.nan,
            "latency_ms": summarize(lat_ms),
            "server_ms": {
                key: mean_or_nan(s.server[key] for s in ok if key in s.server)
                for key in ("decode", "queue", "compute", "encode", "total")
            },
            "batch_size_header": mean_or_nan(
                s.server["batch_size"] for s in ok if "batch_size" in s.server
            ),
            "batch_size_metrics": (
                self.metrics_batch[0] / self.metrics_batch[1]
                if self.metrics_batch and self.metrics_batch[1] > 0
                else math.nan
            ),
            "notes": list(self.notes),
        }
        # what the server's split does not explain: HTTP, multipart parsing, Redis round trips
        parts = ("decode", "queue", "compute", "encode")
        unexplained = [
            s.latency_s * 1000.0 - sum(s.server.get(k, 0.0) for k in parts) for s in ok if s.server
        ]
        out["server_ms"]["other"] = mean_or_nan(unexplained)
        out["batch_size"] = (
            out["batch_size_header"]
            if not math.isnan(out["batch_size_header"])
            else out["batch_size_metrics"]
        )
        if self.mode == "open" and self.samples:
            span = max(s.start_s for s in self.samples)
            out["offered_rate"] = (len(self.samples) - 1) / span if span > 0 else math.nan
        sizes = sorted({s.size for s in self.samples})
        if len(sizes) > 1:
            out["latency_ms_by_size"] = {
                f"{w}x{h}": summarize(x.latency_s * 1000.0 for x in ok if x.size == (w, h))
                for w, h in sizes
            }
        return out

    def merge(self, other: LevelResult) -> None:
        """Pool another run of the same level (e.g. a later round): samples are concatenated
        and wall times added, so images/s stays total images over total time."""
        offset = self.wall_s
        self.samples.extend(replace(s, start_s=s.start_s + offset) for s in other.samples)
        self.wall_s += other.wall_s
        self.notes.extend(other.notes)
        if other.metrics_batch is not None:
            mine = self.metrics_batch or (0.0, 0.0)
            self.metrics_batch = (
                mine[0] + other.metrics_batch[0],
                mine[1] + other.metrics_batch[1],
            )

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "samples": [asdict(s) for s in self.samples]}


@dataclass(frozen=True)
class Bounds:
    """Per level: at most ``max_requests`` requests and ``max_seconds`` of sending."""

    max_requests: int = 64
    max_seconds: float = 30.0
    warmup: int = 0
    timeout_s: float = 60.0


class LoadGenerator:
    """Drives one service URL. Use as an async context manager (it owns the HTTP client)."""

    def __init__(
        self,
        base_url: str,
        workload: Workload,
        *,
        max_connections: int = 64,
        timeout_s: float = 60.0,
        scrape_metrics: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.workload = workload
        self.payloads = workload.payloads()
        self.scrape_metrics = scrape_metrics
        self._rng = random.Random(workload.seed)
        self._timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def __aenter__(self) -> LoadGenerator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    def _next_size(self) -> Size:
        return self._rng.choice(self.workload.sizes)

    async def request(self, size: Size, t0: float) -> Sample:
        """Send one image; never raises (a failure is a Sample with a non-200 status)."""
        body = self.payloads[size]
        path = "/" + self.workload.endpoint
        start = time.perf_counter()
        try:
            if self.workload.upload == "raw":
                resp = await self._client.post(
                    path,
                    params=self.workload.params(),
                    content=body,
                    headers={"content-type": "image/png"},
                )
            else:
                resp = await self._client.post(
                    path,
                    params=self.workload.params(),
                    files={"image": ("bench.png", body, "image/png")},
                )
        except httpx.TimeoutException:
            return Sample(start - t0, time.perf_counter() - start, TIMEOUT_STATUS, size)
        except httpx.TransportError:
            return Sample(start - t0, time.perf_counter() - start, CONNECT_STATUS, size)
        except httpx.HTTPError:
            return Sample(start - t0, time.perf_counter() - start, OTHER_STATUS, size)
        latency = time.perf_counter() - start
        server = parse_server_timing(resp.headers.get("server-timing"))
        if "batch_size" not in server:
            header = resp.headers.get("x-batch-size")
            with contextlib.suppress(ValueError, TypeError):
                server["batch_size"] = float(header)  # type: ignore[arg-type]
        return Sample(
            start_s=start - t0,
            latency_s=latency,
            status=resp.status_code,
            size=size,
            bytes_out=len(resp.content),
            server=server,
            retry_after=resp.headers.get("retry-after"),
            out_size=png_size(resp.content),
        )

    async def metrics_snapshot(self) -> dict[str, float] | None:
        """The server's /metrics, or None if it has none (any server may be load-tested)."""
        if not self.scrape_metrics:
            return None
        try:
            resp = await self._client.get("/metrics", timeout=5.0)
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        return parse_prometheus(resp.text)

    async def _warmup(self, count: int, concurrency: int) -> None:
        if count <= 0:
            return
        sem = asyncio.Semaphore(max(1, concurrency))
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            async with sem:
                await self.request(self.workload.sizes[i % len(self.workload.sizes)], t0)

        await asyncio.gather(*(one(i) for i in range(count)))

    async def closed_loop(self, concurrency: int, bounds: Bounds) -> LevelResult:
        """``concurrency`` callers back to back until the request count or time budget is used."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        await self._warmup(bounds.warmup, concurrency)
        before = await self.metrics_snapshot()
        result = LevelResult(mode="closed", workload=self.workload.label, concurrency=concurrency)
        issued = 0
        t0 = time.perf_counter()
        deadline = t0 + bounds.max_seconds

        async def caller() -> None:
            nonlocal issued
            while issued < bounds.max_requests and time.perf_counter() < deadline:
                issued += 1
                result.samples.append(await self.request(self._next_size(), t0))

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - t0
        if issued < bounds.max_requests:
            result.notes.append(f"time budget {bounds.max_seconds:g}s hit after {issued} requests")
        await self._attach_metrics(result, before)
        return result

    async def open_loop(
        self,
        rate: float,
        bounds: Bounds,
        *,
        poisson: bool = False,
        max_in_flight: int = 256,
    ) -> LevelResult:
        """Send at ``rate`` requests/s regardless of answers (constant gaps, or Poisson).

        A request that would exceed ``max_in_flight`` outstanding ones is not sent and counts as
        ``dropped``: it bounds the client's own memory and sockets when the server stalls.
        """
        if rate <= 0:
            raise ValueError("rate must be > 0")
        await self._warmup(bounds.warmup, 1)
        before = await self.metrics_snapshot()
        result = LevelResult(mode="open", workload=self.workload.label, rate=rate)
        tasks: set[asyncio.Task[None]] = set()
        t0 = time.perf_counter()
        next_at = 0.0

        async def fire(size: Size) -> None:
            result.samples.append(await self.request(size, t0))

        for _ in range(bounds.max_requests):
            if next_at > bounds.max_seconds:
                result.notes.append(f"time budget {bounds.max_seconds:g}s hit")
                break
            delay = t0 + next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            size = self._next_size()
            if len(tasks) >= max_in_flight:
                result.samples.append(Sample(time.perf_counter() - t0, 0.0, DROPPED_STATUS, size))
            else:
                task = asyncio.create_task(fire(size))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_at += self._rng.expovariate(rate) if poisson else 1.0 / rate
        if tasks:
            await asyncio.gather(*list(tasks))
        result.wall_s = time.perf_counter() - t0
        await self._attach_metrics(result, before)
        return result

    async def _attach_metrics(self, result: LevelResult, before: dict[str, float] | None) -> None:
        if before is None:
            return
        after = await self.metrics_snapshot()
        if after is not None:
            result.metrics_batch = histogram_delta(before, after, "batch_size")


async def sweep(
    base_url: str,
    workload: Workload,
    *,
    concurrencies: Sequence[int] = (),
    rates: Sequence[float] = (),
    bounds: Bounds = Bounds(),
    poisson: bool = False,
    scrape_metrics: bool = True,
    progress: bool = True,
) -> list[LevelResult]:
    """Closed-loop levels first (in the order given), then open-loop rates."""
    levels: list[LevelResult] = []
    max_conn = max([*concurrencies, 8]) + 8
    async with LoadGenerator(
        base_url,
        workload,
        max_connections=max_conn if not rates else max(max_conn, 256),
        timeout_s=bounds.timeout_s,
        scrape_metrics=scrape_metrics,
    ) as gen:
        for conc in concurrencies:
            level = await gen.closed_loop(conc, bounds)
            levels.append(level)
            if progress:
                print(_progress_line(level), flush=True)
        for rate in rates:
            level = await gen.open_loop(rate, bounds, poisson=poisson)
            levels.append(level)
            if progress:
                print(_progress_line(level), flush=True)
    return levels


def _progress_line(level: LevelResult) -> str:
    s = level.summary()
    lat = s["latency_ms"]
    where = f"c={level.concurrency}" if level.mode == "closed" else f"rate={level.rate:g}/s"
    errors = (
        ",".join(f"{k}:{v}@{s['error_p50_ms'][k] / 1000:.1f}s" for k, v in s["errors"].items())
        or "none"
    )
    return (
        f"[load] {where:>10}  n={s['requests']:<4} ok={s['ok']:<4} "
        f"img/s={s['images_per_s']:.2f}  p50={lat['p50']:.0f}ms p99={lat['p99']:.0f}ms "
        f"batch={s['batch_size']:.2f}  errors={errors}"
    )

"""What the sync and async clients share: building requests, reading answers, retry timing.

Kept free of I/O so ``Client`` and ``AsyncClient`` differ only in how they send and sleep.
"""

from __future__ import annotations

import mimetypes
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import httpx

from imgsvc_client.errors import parse_retry_after

DEFAULT_URL = "http://127.0.0.1:8000"
OutputFormat = Literal["png", "jpeg", "webp"]
ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO
MixInput = str | Mapping[str, float] | Sequence[tuple[str, float]]

# Answers worth the same request again after a pause: the service is busy or briefly down.
# A 503 job_failed (a job dead-lettered after its deliveries) is not: it would fail again.
RETRYABLE_STATUS = (429, 503)
RETRYABLE_CODES = frozenset(
    {
        "queue_full",
        "queue_busy",
        "queue_unavailable",
        "not_ready",
        "manifest_unavailable",
        "rate_limited",
    }
)
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_TIMING = re.compile(r"^\s*([\w-]+);dur=([\d.]+)\s*$")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait when the service says "busy" (429/503) or cannot be
    connected to.

    ``Retry-After`` is honoured, but capped at ``max_delay_s``: a misconfigured proxy saying
    "come back in an hour" must not freeze a batch job. Without the header the wait starts at
    ``backoff_s`` and doubles. A refused connection is retried fewer times
    (``max_connect_retries``): it rides out a restart, but a wrong URL is reported in a second
    or two instead of after the whole busy-retry budget.
    """

    max_retries: int = 3
    max_delay_s: float = 30.0
    backoff_s: float = 0.5
    max_connect_retries: int = 2

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
        wanted = retry_after if retry_after is not None else self.backoff_s * (2**attempt)
        return max(0.0, min(wanted, self.max_delay_s))

    def next_delay(
        self,
        attempt: int,
        method: str,
        *,
        response: httpx.Response | None = None,
        error: httpx.TransportError | None = None,
    ) -> float | None:
        """The pause before sending again after this answer (or transport error), or None
        when the caller should give up and raise."""
        if error is not None:
            if attempt >= min(self.max_retries, self.max_connect_retries):
                return None
            return self.delay(attempt, None) if retryable_transport_error(error, method) else None
        if attempt >= self.max_retries:
            return None
        if response is not None and retryable(response):
            return self.delay(attempt, retry_after_of(response))
        return None


def retryable(response: httpx.Response) -> bool:
    if response.status_code not in RETRYABLE_STATUS:
        return False
    try:
        code = response.json().get("error")
    except (ValueError, AttributeError):
        return True  # a bare 503/429 from a proxy: busy, by definition
    return code is None or code in RETRYABLE_CODES


def retryable_transport_error(exc: httpx.TransportError, method: str) -> bool:
    """A GET can always be sent again. A POST only when it surely never reached the service
    (no connection): after that, the job may already be queued, and a second one would be
    computed for nobody."""
    if method.upper() == "GET":
        return True
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def retry_after_of(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"))


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes
    content_type: str

    def files(self) -> dict[str, tuple[str, bytes, str]]:
        return {"image": (self.filename, self.data, self.content_type)}


def read_image(image: ImageInput, filename: str | None = None) -> Upload:
    """The bytes to send, read once (so a retry sends them again without re-reading)."""
    if isinstance(image, bytes | bytearray | memoryview):
        data, name = bytes(image), filename or "image"
    elif isinstance(image, str | os.PathLike):
        path = Path(image)
        data, name = path.read_bytes(), filename or path.name
    else:
        data = image.read()
        name = filename or Path(str(getattr(image, "name", "image"))).name
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Upload(name, data, content_type)


def mix_param(mix: MixInput) -> str:
    """``{"mosaic": 0.7, "candy": 0.3}`` (or pairs, or the string itself) as the API's
    ``mosaic:0.7,candy:0.3``."""
    if isinstance(mix, str):
        return mix
    pairs = mix.items() if isinstance(mix, Mapping) else mix
    return ",".join(f"{name}:{float(weight):g}" for name, weight in pairs)


def stylize_params(
    style: str | None,
    *,
    mix: MixInput | None = None,
    strength: float | None = None,
    keep_colors: bool | None = None,
    max_side: int | None = None,
    output_format: OutputFormat | None = None,
    mode: Literal["sync", "async"] = "sync",
) -> dict[str, str]:
    """Query parameters of ``POST /stylize``. A control left at None is not sent at all, so
    the request works with a service that does not know that control."""
    if (style is None) == (mix is None):
        raise ValueError("give exactly one of style= or mix=")
    params: dict[str, str] = {"mix": mix_param(mix)} if mix is not None else {"style": str(style)}
    if strength is not None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be within 0..1, not {strength}")
        params["strength"] = f"{strength:g}"
    if keep_colors is not None:
        params["keep_colors"] = "true" if keep_colors else "false"
    if max_side is not None:
        params["max_side"] = str(int(max_side))
    if output_format is not None:
        params["format"] = output_format
    if mode == "async":
        params["mode"] = "async"
    return params


def upscale_params(
    factor: int,
    *,
    model: str | None = None,
    output_format: OutputFormat | None = None,
    mode: Literal["sync", "async"] = "sync",
) -> dict[str, str]:
    params = {"factor": str(int(factor))}
    if model is not None:
        params["model"] = model
    if output_format is not None:
        params["format"] = output_format
    if mode == "async":
        params["mode"] = "async"
    return params


def parse_server_timing(value: str | None) -> dict[str, float]:
    """``Server-Timing`` as ``{name: milliseconds}``."""
    timings: dict[str, float] = {}
    for part in (value or "").split(","):
        match = _TIMING.match(part)
        if match:
            timings[match.group(1)] = float(match.group(2))
    return timings


@dataclass
class Result:
    """A transformed image and what the service said about it."""

    content: bytes
    content_type: str
    job_id: str | None = None
    batch_size: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    first_frame_only: bool = False

    @property
    def extension(self) -> str:
        """``png``, ``jpg`` or ``webp``, from the content type."""
        return _EXTENSIONS.get(self.content_type.split(";")[0].strip(), "png")

    def save(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        target.write_bytes(self.content)
        return target

    @classmethod
    def from_response(cls, response: httpx.Response) -> Result:
        batch = response.headers.get("x-batch-size", "")
        return cls(
            content=response.content,
            content_type=response.headers.get("content-type", "application/octet-stream"),
            job_id=response.headers.get("x-job-id"),
            batch_size=int(batch) if batch.isdigit() else None,
            timings_ms=parse_server_timing(response.headers.get("server-timing")),
            first_frame_only=response.headers.get("x-input-frames") == "first",
        )


@dataclass(frozen=True)
class Job:
    """An async job as submitted: poll ``status_url`` (``Client.wait`` does)."""

    job_id: str
    status_url: str
    status: str = "queued"

    @classmethod
    def from_response(cls, response: httpx.Response) -> Job:
        body = response.json()
        job_id = str(body["job_id"])
        return cls(job_id, str(body.get("status_url") or f"/jobs/{job_id}"), str(body["status"]))


def job_url(job: Job | str) -> tuple[str, str]:
    """(job id, status URL) of a ``Job`` or a bare job id."""
    if isinstance(job, Job):
        return job.job_id, job.status_url
    return job, f"/jobs/{job}"


@dataclass(frozen=True)
class ModelInfo:
    """One model of ``GET /styles``; ``raw`` has everything else it says (training, metrics)."""

    name: str
    kind: str
    factor: int | None
    loss: str | None
    description: str
    raw: dict[str, Any]
    default: bool = False
    """An upscaler the service uses for its factor when a request names no model."""

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ModelInfo:
        factor = entry.get("factor")
        return cls(
            name=str(entry["name"]),
            kind=str(entry.get("kind", "")),
            factor=int(factor) if factor is not None else None,
            loss=entry.get("loss"),
            description=str(entry.get("description") or ""),
            raw=entry,
            default=bool(entry.get("default", False)),
        )


@dataclass(frozen=True)
class Catalog:
    """``GET /styles``: the styles and upscalers the service has."""

    styles: list[ModelInfo]
    upscalers: list[ModelInfo]

    @property
    def style_names(self) -> list[str]:
        return [m.name for m in self.styles]

    def upscaler_names(self, factor: int | None = None) -> list[str]:
        return [m.name for m in self.upscalers if factor is None or m.factor == factor]

    def default_upscaler(self, factor: int) -> str:
        """What the service upscales by ``factor`` with when no model is named (a service
        older than the ``default`` flag serves ``x{factor}``)."""
        flagged = [m.name for m in self.upscalers if m.factor == factor and m.default]
        return flagged[0] if flagged else f"x{factor}"

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Catalog:
        return cls(
            styles=[ModelInfo.from_json(e) for e in body.get("styles", [])],
            upscalers=[ModelInfo.from_json(e) for e in body.get("upscalers", [])],
        )

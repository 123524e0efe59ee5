"""Typed errors: one exception class per kind of answer the service gives.

The API answers every error with JSON ``{"error": CODE, "detail": ...}`` (README, "Errors");
``error_from_response`` maps the code (or, for a code this client does not know yet, the HTTP
status) to a class, so callers catch what they can act on::

    try:
        client.stylize("photo.jpg", style="mosaic")
    except UnknownStyle as exc:       # exc.available lists the styles
    except ImageTooLarge:             # shrink it (max_side=...) and send again
    except QueueFull as exc:          # still full after the retries; exc.retry_after
    except ServiceError as exc:       # anything else the service said: exc.code, exc.detail

``ServiceUnreachable`` is the one error that is not an answer: nothing answered at all.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx


class ImgsvcError(Exception):
    """Base of every error this client raises."""


class ServiceUnreachable(ImgsvcError):
    """No answer: connection refused, DNS failure, or the read timed out."""


class ServiceError(ImgsvcError):
    """The service answered with an error. ``status_code`` is None for errors the client
    decided itself (a wait that ran out of time)."""

    def __init__(
        self,
        status_code: int | None,
        code: str,
        detail: Any,
        *,
        body: dict[str, Any] | None = None,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        self.status_code = status_code
        self.code = code
        self.detail = detail
        self.body = body or {}
        self.retry_after = retry_after
        self.attempts = attempts
        super().__init__(str(self))

    @property
    def job_id(self) -> str | None:
        value = self.body.get("job_id")
        return str(value) if value else None

    def __str__(self) -> str:
        detail = self.detail
        if isinstance(detail, list):  # FastAPI validation errors
            detail = "; ".join(
                f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}"
                if isinstance(item, dict)
                else str(item)
                for item in detail
            )
        where = f", HTTP {self.status_code}" if self.status_code else ""
        return f"{detail} ({self.code}{where})"


class InvalidImage(ServiceError):
    """400: empty, truncated or corrupt upload, or a malformed multipart body."""


class NotFound(ServiceError):
    """404: an unknown style, model or job."""

    @property
    def available(self) -> list[str]:
        """The names the service does have (styles or models), when it said so."""
        names = self.body.get("styles") or self.body.get("models") or []
        return [str(n) for n in names]


class UnknownStyle(NotFound):
    """404 ``unknown_style``."""


class UnknownModel(NotFound):
    """404 ``unknown_model`` (upscaling)."""


class UnknownJob(NotFound):
    """404 ``unknown_job``: never submitted here, or its result expired."""


class ImageTooLarge(ServiceError):
    """413: too many bytes, too many pixels, an upscale result over the side limit, or more
    compute than the job's timeout allows (``job_too_expensive``: send it async, or smaller)."""


class AuthenticationError(ServiceError):
    """401 (no key, or an unknown one) or 403 (the key lacks the scope)."""


class UnsupportedImage(ServiceError):
    """415: not an image in a format the service reads (or not an image at all)."""


class InvalidRequest(ServiceError):
    """422: a parameter the service refuses (factor, mode, format, model for the factor...)."""


class JobFailed(ServiceError):
    """The job reached a worker, which could not compute it (``job_failed``)."""


class ServiceUnavailable(ServiceError):
    """503: the service cannot take work now (Redis unreachable, no model list...)."""


class QueueFull(ServiceUnavailable):
    """503 ``queue_full``, or ``queue_busy`` (more work queued ahead than the job's timeout
    leaves): backpressure; ``retry_after`` says when to come back."""


class RateLimited(ServiceUnavailable):
    """429: over the key's submission rate (``rate_limited``), or a proxy's limit."""


class JobTimeout(ServiceError):
    """504, or a wait for an async job that ran out of time (``status_code`` None)."""


class ServerError(ServiceError):
    """Any other 5xx."""


_BY_CODE: dict[str, type[ServiceError]] = {
    "unknown_style": UnknownStyle,
    "unknown_model": UnknownModel,
    "unknown_job": UnknownJob,
    "upload_too_large": ImageTooLarge,
    "image_too_large": ImageTooLarge,
    "unsupported_image": UnsupportedImage,
    "unsupported_media_type": UnsupportedImage,
    "queue_full": QueueFull,
    "queue_busy": QueueFull,
    "queue_unavailable": ServiceUnavailable,
    "not_ready": ServiceUnavailable,
    "manifest_unavailable": ServiceUnavailable,
    "timeout": JobTimeout,
    "job_expired": JobTimeout,
    "job_failed": JobFailed,
    "job_too_expensive": ImageTooLarge,
    "rate_limited": RateLimited,
    "missing_api_key": AuthenticationError,
    "invalid_api_key": AuthenticationError,
    "forbidden": AuthenticationError,
}
_BY_STATUS: dict[int, type[ServiceError]] = {
    400: InvalidImage,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFound,
    413: ImageTooLarge,
    415: UnsupportedImage,
    422: InvalidRequest,
    429: RateLimited,
    503: ServiceUnavailable,
    504: JobTimeout,
}


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_response(response: httpx.Response, attempts: int = 1) -> ServiceError:
    """The exception for an error answer (the body is read; it is small JSON)."""
    body: dict[str, Any] = {}
    try:
        parsed = response.json()
        if isinstance(parsed, dict):
            body = parsed
    except ValueError:
        pass
    code = str(body.get("error") or f"http_{response.status_code}")
    detail = body.get("detail") or response.reason_phrase or "error"
    status = response.status_code
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else ServiceError
    return cls(
        status,
        code,
        detail,
        body=body,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        attempts=attempts,
    )

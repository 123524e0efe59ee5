"""What the API answers, as OpenAPI sees it: bodies, headers and examples for every status.

The routes build their responses by hand (images, JSON errors from handlers), so FastAPI cannot
infer these; they are declared here once and attached with ``responses(...)``, which is what makes
``/docs`` and generated clients know about 202, 401, 408, 413, 429, 503 + ``Retry-After``, 504...
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every error: a stable code, a sentence for people, sometimes more fields (``styles``,
    ``queue_depth``, ``limit``...)."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="Machine-readable code (the README's error table).")
    detail: Any = Field(description="What was wrong, for people; a list for invalid_request.")


class JobAccepted(BaseModel):
    """``mode=async``: the job is queued; poll ``status_url``."""

    job_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    status: str = Field(description="`queued`.")
    status_url: str


class JobStatusBody(BaseModel):
    """An async job that has no result yet."""

    job_id: str
    status: str = Field(description="`queued`, `running` or (after DELETE) `cancelled`.")
    status_url: str


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    redis: bool
    workers: int
    measuring: int = Field(
        0,
        description="Live workers still measuring their models' costs after a start: they serve "
        "meanwhile (a job may wait for one probe) and admission assumes a cost until then.",
    )


_H_REQUEST_ID = {
    "description": "The request id: the caller's X-Request-ID, else the trace id of its "
    "traceparent, else a new one. It is on every log line of the request and its job.",
    "schema": {"type": "string"},
}
_H_RETRY_AFTER = {
    "description": "Seconds to wait before sending the same request again.",
    "schema": {"type": "integer"},
}
_H_JOB_ID = {"description": "The job's id (GET/DELETE /jobs/{id}).", "schema": {"type": "string"}}
_H_SERVER_TIMING = {
    "description": "decode (API), queue, compute, encode (worker) and total, in ms.",
    "schema": {"type": "string"},
    "example": "decode;dur=1.2, queue;dur=10.4, compute;dur=58.0, encode;dur=6.1, total;dur=80.2",
}
_H_AUTH = {"description": "How to authenticate: `Bearer`.", "schema": {"type": "string"}}


def _error(description: str, *examples: tuple[str, str], headers: dict[str, Any] | None = None
           ) -> dict[str, Any]:  # fmt: skip
    content: dict[str, Any] = {}
    if examples:
        content["examples"] = {
            code: {"summary": code, "value": {"error": code, "detail": detail}}
            for code, detail in examples
        }
    return {
        "description": description,
        "model": ErrorBody,
        "content": {"application/json": content},
        "headers": {"X-Request-ID": _H_REQUEST_ID, **(headers or {})},
    }


ERRORS: dict[int, dict[str, Any]] = {
    400: _error(
        "Empty body, not decodable (truncated, corrupt, zero-sized), bad multipart.",
        ("empty_body", "the request carried no image (empty body)"),
        ("corrupt_image", "the data starts like a PNG file but its header is missing or invalid"),
        ("malformed_multipart", "cannot parse the multipart body"),
    ),
    401: _error(
        "No API key, or an unknown one (when the route needs one).",
        ("missing_api_key", "this route needs an API key"),
        ("invalid_api_key", "the API key is not known"),
        headers={"WWW-Authenticate": _H_AUTH},
    ),
    403: _error("The key lacks the scope.", ("forbidden", "the key 'alice' lacks 'admin'")),
    404: _error(
        "Unknown style, model or job; the body lists the available names.",
        ("unknown_style", "no style named 'nope'; available: candy, mosaic"),
        ("unknown_job", "no job 0123... (never submitted, or expired)"),
    ),
    408: _error(
        "The request's headers or body did not arrive in time (slow or stalled client).",
        ("request_timeout", "request body not received in time"),
    ),
    410: _error("The job was cancelled (DELETE).", ("job_cancelled", "job ... was cancelled")),
    413: _error(
        "Upload, pixels or estimated compute over a limit; the detail names the limit.",
        ("upload_too_large", "uploads are limited to 20971520 bytes"),
        ("image_too_large", "image is 5000x5000 = 25000000 pixels; at most 16777216"),
        ("job_too_expensive", "estimated 160 s of compute; synchronous jobs get at most 30 s"),
    ),
    415: _error(
        "Not an image in a supported format, or not sent as an image.",
        ("unsupported_image", "not an image in a supported format (PNG, JPEG, ...)"),
        ("unsupported_media_type", "send the image as multipart/form-data field 'image'"),
    ),
    422: _error(
        "Invalid parameter: factor, mode, format, style/mix, model of the wrong kind.",
        ("invalid_factor", "factor must be one of [4, 8], not 3"),
        ("model_kind_mismatch", "'x4' is an upscaling model; use POST /upscale?model=x4"),
        (
            "invalid_request",
            "[{'loc': ['query', 'strength'], 'msg': '...', 'allowed': '0.0 <= strength <= 1.0'}]",
        ),
        ("repeated_parameter", "each query parameter takes one value; given more than once: style"),
        ("unknown_parameter", "/upscale takes no query parameter max_side; it takes: factor, ..."),
    ),
    429: _error(
        "Over the key's submission rate.",
        ("rate_limited", "more than 60 submissions a minute; retry in 3 s"),
        headers={"Retry-After": _H_RETRY_AFTER},
    ),
    503: _error(
        "Queue full or busy past the job's timeout, Redis unreachable, or no worker could "
        "finish the job; retry after Retry-After.",
        ("queue_full", "queue is full (64 jobs waiting, limit 64)"),
        ("queue_busy", "the 9 job(s) ahead of this one in the bulk lane need about 71.0 s ..."),
        ("queue_unavailable", "the job queue is unreachable"),
        ("job_failed", "job abandoned: its worker died 3 times while computing it"),
        headers={"Retry-After": _H_RETRY_AFTER},
    ),
    504: _error(
        "No result in time; the job was cancelled (stopped if it was running).",
        ("timeout", "no result within 60 s; the job was cancelled"),
        ("deadline_exceeded", "deadline passed while computing; stopped"),
    ),
}

_IMAGE_200 = {
    "description": "The transformed image (PNG unless `format` asks otherwise).",
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "image/webp": {"schema": {"type": "string", "format": "binary"}},
    },
    "headers": {
        "X-Request-ID": _H_REQUEST_ID,
        "X-Job-Id": _H_JOB_ID,
        "Server-Timing": _H_SERVER_TIMING,
        "X-Batch-Size": {
            "description": "Jobs that shared the forward pass.",
            "schema": {"type": "integer"},
        },
        "X-Model": {
            "description": "The zoo model that made the image (see `GET /styles`).",
            "schema": {"type": "string"},
        },
        "X-Input-Frames": {
            "description": "`first` when an animated input was served from its first frame.",
            "schema": {"type": "string"},
        },
    },
}


def _json(model: type[BaseModel], description: str, example: dict[str, Any],
          headers: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "description": description,
        "model": model,
        "content": {"application/json": {"example": example}},
        "headers": {"X-Request-ID": _H_REQUEST_ID, **(headers or {})},
    }


_ACCEPTED = _json(
    JobAccepted,
    "`mode=async`: queued; poll `status_url` (also in `Location`).",
    {"job_id": "0" * 32, "status": "queued", "status_url": "/jobs/" + "0" * 32},
    {"Location": {"description": "The status URL.", "schema": {"type": "string"}},
     "X-Job-Id": _H_JOB_ID},
)  # fmt: skip
_PENDING = _json(
    JobStatusBody,
    "Not finished yet: `queued` or `running`; poll again after Retry-After.",
    {"job_id": "0" * 32, "status": "running", "status_url": "/jobs/" + "0" * 32},
    {"Retry-After": _H_RETRY_AFTER},
)


def responses(*codes: int, image: bool = False, accepted: bool = False,
              pending: bool = False) -> dict[int | str, dict[str, Any]]:  # fmt: skip
    """The ``responses=`` of a route: its success answers and the listed error statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    if image:
        out[200] = _IMAGE_200
    if accepted:
        out[202] = _ACCEPTED
    if pending:
        out[202] = _PENDING
    for code in codes:
        out[code] = ERRORS[code]
    return out


IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image: multipart/form-data with a file field `image`, or the raw "
        "bytes with an image/* (or application/octet-stream) Content-Type.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

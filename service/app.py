"""The HTTP front end: validate uploads, queue jobs in Redis, answer with the worker's image.

``create_app`` is the factory (``uvicorn service.app:create_app --factory``, or ``python -m
service``). The API never imports torch: models are known from the zoo manifest, the work is done
by ``python -m worker`` processes reading the same Redis stream.

Every error is JSON ``{"error": <code>, "detail": <message or list>, ...}`` with a 4xx status for
bad input, 503 (with ``Retry-After``) when the queue is full or Redis is unreachable, 504 when the
result did not come in time (the job is cancelled so no worker computes it for nobody).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from jobqueue.protocol import Job, JobResult, Operation, OutputFormat, StyleControls
from model_zoo.styles import StyleMixError, UnknownStyleError
from service.catalog import ModelCatalog, ModelMismatchError, UnknownModelError
from service.errors import ApiError, error_response, install_error_handlers
from service.images import DecodedImage, ImageLimits, configure_pillow, decode_image
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.metrics import ApiMetrics, RequestMetricsMiddleware
from service.queue import JobQueue, JobTimeoutError, QueueFullError, ResultMissingError
from service.settings import ApiSettings
from service.uploads import read_image_body
from service.web import install_web

UPSCALE_FACTORS = (4, 8)
PROBE_TIMEOUT_S = 2.0
_JOB_ID_PATTERN = r"^[0-9a-f]{32}$"

_IMAGE_BODY: dict[str, Any] = {
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
_ERROR_SCHEMA = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}, "detail": {}},
                "required": ["error", "detail"],
            }
        }
    }
}
_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The transformed image (PNG unless `format` asks otherwise).",
        "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
    },
    202: {"description": "`mode=async`: `{job_id, status, status_url}`."},
    400: {"description": "Empty body, corrupt or truncated image.", **_ERROR_SCHEMA},
    404: {"description": "Unknown model; the body lists the available ones.", **_ERROR_SCHEMA},
    413: {"description": "Upload or pixel count over the limits.", **_ERROR_SCHEMA},
    415: {"description": "Not an image in a supported format.", **_ERROR_SCHEMA},
    422: {"description": "Invalid query parameter.", **_ERROR_SCHEMA},
    503: {"description": "Queue full or Redis unreachable; see Retry-After.", **_ERROR_SCHEMA},
    504: {"description": "No result within REQUEST_TIMEOUT_S; the job was cancelled."},
}

FormatParam = Literal["png", "jpeg", "jpg", "webp"]
ModeParam = Literal["sync", "async"]
ModeQuery = Annotated[
    ModeParam, Query(description="`async`: answer 202 with a job id at once, poll /jobs/{id}.")
]
FormatQuery = Annotated[
    FormatParam, Query(alias="format", description="Output encoding (jpg = jpeg).")
]


router = APIRouter()


def _settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def _queue(request: Request) -> JobQueue:
    return request.app.state.queue


def _metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def _catalog(request: Request) -> ModelCatalog:
    return request.app.state.catalog


@router.post(
    "/stylize",
    openapi_extra=_IMAGE_BODY,
    responses=_IMAGE_RESPONSES,
    response_class=Response,
    summary="Stylise an image with a zoo style model",
)
async def stylize(
    request: Request,
    style: Annotated[
        str | None,
        Query(min_length=1, max_length=64, description="Style name (GET /styles)."),
    ] = None,
    mix: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=512,
            description="Instead of `style`: a mix of styles of one multi-style net, "
            "`NAME:WEIGHT,...` (e.g. `mosaic:0.7,candy:0.3`); weights >= 0, normalised.",
        ),
    ] = None,
    strength: Annotated[
        float,
        Query(ge=0.0, le=1.0, description="How much style, 0..1 (1 = full; README: how)."),
    ] = 1.0,
    keep_colors: Annotated[
        bool,
        Query(description="Keep the photo's colours: only luminance is stylised."),
    ] = False,
    max_side: Annotated[
        int | None,
        Query(
            ge=16,
            le=8192,
            description="Shrink the photo so its longer side is at most this before stylising "
            "(strokes look larger on a smaller photo).",
        ),
    ] = None,
    mode: ModeQuery = "sync",
    output_format: FormatQuery = "png",
) -> Response:
    if (style is None) == (mix is None):
        raise ApiError(
            422,
            "missing_style" if style is None else "conflicting_parameters",
            "give either style=NAME or mix=NAME:WEIGHT,... (not both)",
            parameters=["style", "mix"],
        )
    catalog = _catalog(request)
    try:
        choice = catalog.style(style, mix)
    except UnknownStyleError as exc:
        if catalog.kind_of(exc.name) == "sr":
            raise ApiError(
                422,
                "model_kind_mismatch",
                f"{exc.name!r} is an upscaling model; use POST /upscale?model={exc.name}",
            ) from exc
        raise ApiError(
            404,
            "unknown_style",
            f"no style named {exc.name!r}; available: {', '.join(exc.available) or 'none'}",
            styles=exc.available,
        ) from exc
    except StyleMixError as exc:
        raise ApiError(422, "invalid_style_mix", str(exc), parameter="mix") from exc
    controls = StyleControls(
        slots=choice.slots,
        identity=choice.identity,
        strength=strength,
        keep_colors=keep_colors,
    )
    limits = ImageLimits(max_pixels=_settings(request).max_style_pixels, fit_side=max_side)
    return await _submit(
        request, "stylize", choice.model, limits, mode, output_format, controls=controls
    )


@router.post(
    "/upscale",
    openapi_extra=_IMAGE_BODY,
    responses=_IMAGE_RESPONSES,
    response_class=Response,
    summary="Upscale an image 4x or 8x with a zoo super-resolution model",
)
async def upscale(
    request: Request,
    factor: Annotated[int, Query(description="Upscaling factor: 4 or 8.")],
    model: Annotated[
        str | None,
        Query(min_length=1, max_length=64, description="SR model (default `x{factor}`)."),
    ] = None,
    mode: ModeQuery = "sync",
    output_format: FormatQuery = "png",
) -> Response:
    if factor not in UPSCALE_FACTORS:
        raise ApiError(
            422,
            "invalid_factor",
            f"factor must be one of {list(UPSCALE_FACTORS)}, not {factor}",
            factors=list(UPSCALE_FACTORS),
        )
    catalog = _catalog(request)
    try:
        entry = catalog.upscaler(factor, model)
    except UnknownModelError as exc:
        if catalog.kind_of(exc.name) == "style" or exc.name in catalog.manifest().styles():
            raise ApiError(
                422,
                "model_kind_mismatch",
                f"{exc.name!r} is a style; use POST /stylize?style={exc.name}",
            ) from exc
        raise ApiError(
            404,
            "unknown_model",
            f"no upscaling model named {exc.name!r}; "
            f"available: {', '.join(exc.available) or 'none'}",
            models=exc.available,
        ) from exc
    except ModelMismatchError as exc:
        raise ApiError(422, "model_factor_mismatch", str(exc)) from exc
    side = _settings(request).max_upscale_input_side(factor)
    limits = ImageLimits(max_pixels=side * side, max_side=side)
    return await _submit(request, "upscale", entry.name, limits, mode, output_format)


@router.get("/jobs/{job_id}", name="get_job", response_class=Response, summary="Async job")
async def get_job(
    request: Request, job_id: Annotated[str, Path(pattern=_JOB_ID_PATTERN)]
) -> Response:
    """202 with `{job_id, status}` while queued or running; then the image (or the job's error).

    Results stay fetchable for the worker's result TTL.
    """
    queue = _queue(request)
    result = await queue.fetch(job_id)
    if result is not None:
        return _result_response(result, job_id)
    status = await queue.status(job_id)
    if status is None:
        raise ApiError(404, "unknown_job", f"no job {job_id} (never submitted, or expired)")
    state = str(status.get("state", "queued"))
    deadline = float(status.get("deadline") or 0.0)
    grace = _settings(request).request_timeout_s
    if state == "queued" and deadline and time.time() > deadline + grace:
        raise ApiError(504, "job_expired", "the job was not started before its deadline")
    body = {"job_id": job_id, "status": state, "status_url": _status_url(request, job_id)}
    return JSONResponse(body, status_code=202, headers={"Retry-After": "1"})


@router.get("/styles", summary="Models of the zoo, with their metadata")
async def styles(request: Request) -> dict[str, Any]:
    return _catalog(request).describe()


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: Redis reachable and at least one live worker")
async def readyz(request: Request) -> Response:
    queue = _queue(request)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await queue.ping()
            workers = await queue.live_workers()
    except (RedisError, OSError, TimeoutError) as exc:
        return error_response(
            503, "not_ready", f"redis unreachable: {exc or type(exc).__name__}", redis=False
        )
    if workers == 0:
        return error_response(503, "not_ready", "no live worker heartbeat", redis=True, workers=0)
    return JSONResponse({"status": "ready", "redis": True, "workers": workers})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = _metrics(request)
    queue = _queue(request)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            registry.queue_depth.set(await queue.depth())
            registry.workers.set(await queue.live_workers())
        registry.redis_up.set(1)
    except (RedisError, OSError, TimeoutError):
        registry.redis_up.set(0)
    return Response(registry.render(), media_type=METRICS_CONTENT_TYPE)


async def _submit(
    request: Request,
    op: Operation,
    model: str,
    limits: ImageLimits,
    mode: ModeParam,
    output_format: FormatParam,
    controls: StyleControls | None = None,
) -> Response:
    started = time.perf_counter()
    settings = _settings(request)
    metrics_ = _metrics(request)
    data = await read_image_body(request, settings.max_upload_bytes)
    decode_started = time.perf_counter()
    image: DecodedImage = await run_in_threadpool(decode_image, data, limits)
    decode_s = time.perf_counter() - decode_started
    metrics_.decode.observe(decode_s)
    fmt: OutputFormat = "jpeg" if output_format == "jpg" else output_format
    timeout = settings.request_timeout_s if mode == "sync" else settings.async_job_timeout_s
    job = Job(
        model=model,
        op=op,
        width=image.width,
        height=image.height,
        channels=image.channels,
        pixels=image.pixels,
        output_format=fmt,
        deadline=time.time() + timeout,
        controls=controls or StyleControls(),
    )
    queue = _queue(request)
    try:
        enqueued = await queue.enqueue(job, status_ttl_s=int(timeout + settings.result_ttl_s))
    except QueueFullError as exc:
        metrics_.jobs.labels(op, "rejected").inc()
        raise ApiError(
            503,
            "queue_full",
            str(exc),
            headers={"Retry-After": str(settings.retry_after_s)},
            queue_depth=exc.depth,
        ) from exc
    metrics_.queue_depth.set(enqueued.depth)
    extra_headers = {"X-Job-Id": job.job_id}
    if image.animated:
        extra_headers["X-Input-Frames"] = "first"
    if mode == "async":
        url = _status_url(request, job.job_id)
        body = {"job_id": job.job_id, "status": "queued", "status_url": url}
        return JSONResponse(body, status_code=202, headers={"Location": url, **extra_headers})
    try:
        result = await queue.wait(job.job_id, job.deadline)
    except JobTimeoutError as exc:
        metrics_.jobs.labels(op, "timeout").inc()
        raise ApiError(
            504,
            "timeout",
            f"no result within {timeout:g} s; the job was cancelled",
            job_id=job.job_id,
        ) from exc
    except ResultMissingError as exc:
        metrics_.jobs.labels(op, "failed").inc()
        raise ApiError(502, "result_missing", "the job finished but its result is gone") from exc
    metrics_.jobs.labels(op, "ok" if result.ok else "failed").inc()
    if result.ok:
        metrics_.observe_timings(op, result.timings)
        metrics_.image_seconds.labels(op).observe(time.perf_counter() - started)
    response = _result_response(result, job.job_id, decode_s=decode_s, started=started)
    response.headers.update(extra_headers)
    return response


def _status_url(request: Request, job_id: str) -> str:
    return str(request.app.url_path_for("get_job", job_id=job_id))


def _result_response(
    result: JobResult,
    job_id: str,
    *,
    decode_s: float | None = None,
    started: float | None = None,
) -> Response:
    timing = server_timing(result.timings, decode_s=decode_s, started=started)
    headers = {"X-Job-Id": job_id}
    if timing:
        headers["Server-Timing"] = timing
    batch = result.timings.get("batch_size")
    if isinstance(batch, int | float):
        headers["X-Batch-Size"] = str(int(batch))
    if not result.ok:
        status = result.status_code if 400 <= result.status_code < 600 else 500
        return error_response(
            status, "job_failed", result.error or "the worker failed", headers, job_id=job_id
        )
    return Response(result.image, media_type=result.content_type or "image/png", headers=headers)


_TOKEN = re.compile(r"[^A-Za-z0-9_\-]")


def server_timing(
    timings: dict[str, float], *, decode_s: float | None = None, started: float | None = None
) -> str:
    """``Server-Timing`` value in milliseconds: decode (API), queue, compute, encode (worker)."""
    parts: list[str] = []
    if decode_s is not None:
        parts.append(f"decode;dur={decode_s * 1000:.1f}")
    for name, value in timings.items():
        if name == "batch_size" or not isinstance(value, int | float):
            continue
        parts.append(f"{_TOKEN.sub('_', name)};dur={value * 1000:.1f}")
    if started is not None:
        parts.append(f"total;dur={(time.perf_counter() - started) * 1000:.1f}")
    return ", ".join(parts)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """Build the app; ``settings`` default to the environment / ``.env``."""
    settings = settings or ApiSettings()
    largest_upscale_input = max(settings.max_upscale_input_side(f) for f in UPSCALE_FACTORS) ** 2
    configure_pillow(max(settings.max_style_pixels, largest_upscale_input))
    metrics_ = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.queue = JobQueue(settings)
        try:
            yield
        finally:
            await app.state.queue.close()

    app = FastAPI(
        title="Perceptual image transforms",
        summary="Fast style transfer and super-resolution (Johnson et al. 2016) over HTTP.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics_
    app.state.catalog = ModelCatalog(settings.model_zoo_dir)
    install_error_handlers(app)
    app.include_router(router)
    install_web(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics_)
    return app

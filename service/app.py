"""The HTTP front end: validate uploads, admit or refuse jobs by cost, queue them in Redis,
answer with the worker's image.

``create_app`` is the factory (``python -m service`` serves it with ``service.server``). The API
never imports torch: models are known from the zoo manifest, their cost from what the workers
measured (``jobqueue.protocol.ModelCost``), and the work is done by ``python -m worker``
processes reading the same Redis streams (``jobqueue.client`` is the API's side of it).

A submission is refused as early and as cheaply as possible, in this order: auth and rate limit
(before the body is read); the upload's byte size (``Content-Length``, then while reading); the
header's pixel limits; the job's estimated compute against its timeout (413
``job_too_expensive``); a full queue (503 ``queue_full``); more work queued ahead of the job
than its timeout leaves (503 ``queue_busy``) - all before decoding, permanent refusals before
the transient ones, so a retry is only suggested when it can help. Then decoding, at most
``MAX_CONCURRENT_DECODES`` at a time, and the exact, atomic queue checks of the enqueue.

Every error is JSON ``{"error": <code>, "detail": <message or list>, ...}`` with a 4xx status for
bad input, 503 (with ``Retry-After``) when the queue is full or Redis is unreachable, 504 when the
result did not come in time (the job is cancelled, and stopped if a worker is computing it).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BeforeValidator
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.gzip import GZipMiddleware

from jobqueue.client import (
    JobAbandonedError,
    JobQueue,
    JobTimeoutError,
    QueueBusyError,
    QueueFullError,
    ResultMissingError,
)
from jobqueue.protocol import (
    JOB_ID_PATTERN,
    Job,
    JobResult,
    JobStatus,
    Lane,
    Operation,
    OutputFormat,
    StyleControls,
)
from model_zoo.styles import StyleMixError, UnknownStyleError
from service.auth import AccessGuard, Caller, job_caller, take_token
from service.catalog import ModelCatalog, ModelMismatchError, UnknownModelError
from service.errors import (
    ApiError,
    ClientGoneError,
    declared_query_parameters,
    error_response,
    install_error_handlers,
)
from service.images import ImageLimits, configure_pillow, decode_image, probe_image
from service.keys import KeyStore
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.metrics import ApiMetrics, RequestMiddleware
from service.schemas import IMAGE_BODY, Health, JobStatusBody, Ready, responses
from service.settings import ApiSettings
from service.uploads import read_image_body
from service.web import install_web

UPSCALE_FACTORS = (4, 8)
GZIP_MIN_BYTES = 1024
PROBE_TIMEOUT_S = 2.0

FormatParam = Literal["png", "jpeg", "jpg", "webp"]
ModeParam = Literal["sync", "async"]
ModeQuery = Annotated[
    ModeParam, Query(description="`async`: answer 202 with a job id at once, poll /jobs/{id}.")
]
FormatQuery = Annotated[
    FormatParam, Query(alias="format", description="Output encoding (jpg = jpeg).")
]
CallerDep = Annotated[Caller, Depends(job_caller)]
JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The job's id.")]

SUBMIT_ERRORS = (400, 401, 403, 404, 408, 413, 415, 422, 429, 503, 504)


def _whole_number(value: object) -> object:
    """``factor=4.0`` or ``factor=+4`` are refused, not read as 4: a parameter with one
    spelling keeps caches, logs and clients honest."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,4}", value):
        raise ValueError("factor must be written as a whole number (4 or 8)")
    return value


def _query_parameters_as_declared(request: Request) -> None:
    """Query parameters are taken as declared or refused, never half-read.

    ``?style=mosaic&style=candy`` would be read as one of them: every parameter here takes one
    value, and a client that sends two has a bug it should hear about. A parameter the endpoint
    does not take would be ignored: ``/upscale?factor=4&max_side=128`` (``max_side`` is a
    ``/stylize`` parameter) answered a full-size 2400 x 1600 upscale after 17 s instead of
    saying that the limit it asked for does not exist there."""
    counts = Counter(name for name, _ in request.query_params.multi_items())
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise ApiError(
            422,
            "repeated_parameter",
            f"each query parameter takes one value; given more than once: {', '.join(repeated)}",
            parameters=repeated,
        )
    declared = declared_query_parameters(request)
    if declared is None:
        return
    known = sorted(p["name"] for p in declared)
    unknown = sorted(set(counts) - set(known))
    if unknown:
        raise ApiError(
            422,
            "unknown_parameter",
            f"{request.url.path} takes no query parameter {', '.join(unknown)}; it takes: "
            f"{', '.join(known) or 'none'}",
            parameters=unknown,
            allowed=known,
        )


router = APIRouter(dependencies=[Depends(_query_parameters_as_declared)])


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
    openapi_extra=IMAGE_BODY,
    responses=responses(*SUBMIT_ERRORS, image=True, accepted=True),
    response_class=Response,
    summary="Stylise an image with a zoo style model",
)
async def stylize(
    request: Request,
    caller: CallerDep,
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
        Query(
            ge=0.0,
            le=1.0,
            allow_inf_nan=False,
            description="How much style, 0..1 (1 = full; README: how).",
        ),
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
            "(strokes look larger on a smaller photo; the job costs less too).",
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
        request, caller, "stylize", choice.model, limits, mode, output_format, controls=controls
    )


@router.post(
    "/upscale",
    openapi_extra=IMAGE_BODY,
    responses=responses(*SUBMIT_ERRORS, image=True, accepted=True),
    response_class=Response,
    summary="Upscale an image 4x or 8x with a zoo super-resolution model",
)
async def upscale(
    request: Request,
    caller: CallerDep,
    factor: Annotated[
        int,
        Query(description="Upscaling factor: 4 or 8.", examples=[4]),
        BeforeValidator(_whole_number),
    ],
    model: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            description="SR model; default: the factor's measured best (`default` in GET /styles).",
        ),
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
    return await _submit(
        request, caller, "upscale", entry.name, limits, mode, output_format, factor=factor
    )


async def _owned_status(request: Request, caller: Caller, job_id: str) -> JobStatus | None:
    """The job's status record, if the caller may see the job: with auth, a job belongs to the
    key that submitted it (others get the same 404 as for an unknown job)."""
    status = await _queue(request).status(job_id)
    if status is None or not status.owner or caller.key is None:
        return status
    if status.owner != caller.owner and not caller.key.allows("admin"):
        raise ApiError(404, "unknown_job", f"no job {job_id} (never submitted, or expired)")
    return status


@router.get(
    "/jobs/{job_id}",
    name="get_job",
    response_class=Response,
    summary="Async job: its state while pending, then the image",
    responses=responses(401, 403, 404, 410, 422, 503, 504, image=True, pending=True),
)
async def get_job(request: Request, caller: CallerDep, job_id: JobIdPath) -> Response:
    """202 with `{job_id, status}` while queued or running; then the image (or the job's error).

    Results stay fetchable for the worker's result TTL.
    """
    queue = _queue(request)
    status = await _owned_status(request, caller, job_id)
    result = await queue.fetch(job_id)
    if result is not None:
        if status is not None:
            request.state.imgsvc_job = {"job_id": job_id, "model": status.model, "op": status.op}
            if await queue.first_report(job_id):
                _count_async_answer(request, status, result)
        response = _result_response(result, job_id, retry_after=_settings(request).retry_after_s)
        if status is not None and status.model:
            response.headers["X-Model"] = status.model
        return response
    if status is None:
        raise ApiError(404, "unknown_job", f"no job {job_id} (never submitted, or expired)")
    if status.state == "cancelled":
        raise ApiError(410, "job_cancelled", f"job {job_id} was cancelled", job_id=job_id)
    grace = _settings(request).request_timeout_s
    if status.state == "queued" and status.deadline and time.time() > status.deadline + grace:
        raise ApiError(504, "job_expired", "the job was not started before its deadline")
    body = {"job_id": job_id, "status": status.state, "status_url": _status_url(request, job_id)}
    return JSONResponse(body, status_code=202, headers={"Retry-After": "1"})


@router.delete(
    "/jobs/{job_id}",
    summary="Cancel a job: not started, it is never computed; running, it stops at the next "
    "forward pass; finished, its result is deleted",
    response_model=JobStatusBody,
    responses=responses(401, 403, 404, 422, 503),
)
async def cancel_job(request: Request, caller: CallerDep, job_id: JobIdPath) -> JobStatusBody:
    queue = _queue(request)
    status = await _owned_status(request, caller, job_id)
    if status is None and await queue.fetch(job_id) is None:
        raise ApiError(404, "unknown_job", f"no job {job_id} (never submitted, or expired)")
    record = status or JobStatus("cancelled", job_id=job_id)
    record.state, record.updated_at = "cancelled", time.time()
    await queue.cancel(job_id, keep_status=record)
    request.state.imgsvc_job = {"job_id": job_id, "model": record.model, "op": record.op}
    if record.model:
        _metrics(request).jobs.labels(record.op, record.model, "async", "cancelled").inc()
    return JobStatusBody(job_id=job_id, status="cancelled", status_url=_status_url(request, job_id))


@router.get("/styles", summary="Styles and models of the zoo (public view: no paths)")
async def styles(request: Request) -> dict[str, Any]:
    return _catalog(request).describe()


@router.get("/healthz", summary="Liveness: the process answers", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Readiness: Redis reachable and at least one live worker",
    response_model=Ready,
    responses=responses(503),
)
async def readyz(request: Request) -> Response:
    queue = _queue(request)
    retry = {"Retry-After": str(_settings(request).retry_after_s)}
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await queue.ping()
            workers, measuring = await queue.readiness()
    except (RedisError, OSError, TimeoutError) as exc:
        return error_response(
            503, "not_ready", f"redis unreachable: {exc or type(exc).__name__}", retry,
            redis=False,
        )  # fmt: skip
    if workers == 0:
        return error_response(
            503, "not_ready", "no live worker heartbeat", retry, redis=True, workers=0
        )
    return JSONResponse(
        {"status": "ready", "redis": True, "workers": workers, "measuring": measuring}
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics of this API process",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **responses(401, 403),
    },
)
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


async def _estimate(
    request: Request, model: str, output_pixels: int, width: int, height: int
) -> tuple[float, float, bool]:
    """(estimated seconds, seconds per megapixel, measured?) of a job of ``model`` with a
    ``width`` x ``height`` input (the worker tiles big inputs, at a cost of its own)."""
    costs = await _queue(request).costs()
    cost = costs.get(model)
    if cost is not None and cost.seconds_per_megapixel > 0:
        per_mpx = cost.seconds_per_megapixel_at(width, height)
        return per_mpx * output_pixels / 1e6, per_mpx, True
    per_mpx = _settings(request).assumed_seconds_per_megapixel
    return per_mpx * output_pixels / 1e6, per_mpx, False


def _too_expensive(
    settings: ApiSettings,
    mode: ModeParam,
    model: str,
    output: tuple[int, int],
    estimate: tuple[float, float, bool],
) -> ApiError:
    seconds, per_mpx, measured = estimate
    width, height = output
    sync_limit = settings.admission_headroom * settings.request_timeout_s
    async_limit = settings.admission_headroom * settings.async_job_timeout_s
    limit = sync_limit if mode == "sync" else async_limit
    basis = "measured by the workers" if measured else "assumed (not measured yet)"
    hint = (
        f" Send it with mode=async (up to {async_limit:g} s), or a smaller image."
        if mode == "sync" and seconds <= async_limit
        else " Send a smaller image (or max_side for /stylize)."
    )
    setting = "REQUEST_TIMEOUT_S" if mode == "sync" else "ASYNC_JOB_TIMEOUT_S"
    return ApiError(
        413,
        "job_too_expensive",
        f"a {width}x{height} result of {model} is estimated at {seconds:.1f} s of compute "
        f"({per_mpx:.2f} s per megapixel, {basis}); {mode} jobs may take at most {limit:g} s "
        f"(ADMISSION_HEADROOM x {setting}).{hint}",
        estimated_s=round(seconds, 3),
        limit_s=limit,
        seconds_per_megapixel=round(per_mpx, 4),
    )


async def _submit(
    request: Request,
    caller: Caller,
    op: Operation,
    model: str,
    limits: ImageLimits,
    mode: ModeParam,
    output_format: FormatParam,
    controls: StyleControls | None = None,
    factor: int = 1,
) -> Response:
    started = time.perf_counter()
    settings = _settings(request)
    metrics_ = _metrics(request)
    queue = _queue(request)
    request.state.imgsvc_job = job_info = {"op": op, "model": model, "mode": mode}
    await take_token(request, caller)
    # Permanent refusals first (a retry cannot help), all before decoding: the bytes (capped
    # while reading), the header's pixels, the estimated compute.
    data = await read_image_body(request, settings.max_upload_bytes)
    header = await run_in_threadpool(probe_image, data, limits)
    width, height = header.fitted(limits)
    output_pixels = width * height * factor * factor
    timeout = settings.request_timeout_s if mode == "sync" else settings.async_job_timeout_s
    estimate = await _estimate(request, model, output_pixels, width, height)
    if estimate[0] > settings.admission_headroom * timeout:
        metrics_.jobs.labels(op, model, mode, "too_expensive").inc()
        raise _too_expensive(settings, mode, model, (width * factor, height * factor), estimate)
    lane: Lane = "bulk" if estimate[0] >= settings.bulk_lane_cost_s else "interactive"
    try:
        await queue.ensure_room()  # before decoding: a burst at a full queue costs no memory
    except QueueFullError as exc:
        metrics_.jobs.labels(op, model, mode, "rejected").inc()
        raise _queue_full(settings, exc) from exc
    # The work this job may queue behind (None: no limit), checked here before decoding and
    # again, exactly, by the enqueue.
    workers, max_ahead_s = await _queue_wait_limit(request, estimate[0], timeout)
    if max_ahead_s is not None:
        ahead_s, ahead_jobs = await queue.work_ahead(lane)
        if ahead_jobs and ahead_s > max_ahead_s:
            metrics_.jobs.labels(op, model, mode, "busy").inc()
            raise _queue_busy(lane, ahead_s, ahead_jobs, workers, estimate[0], timeout)

    decode_started = time.perf_counter()
    async with request.app.state.decode_slots:
        metrics_.decodes_in_progress.inc()
        try:
            image = await run_in_threadpool(decode_image, data, limits)
        finally:
            metrics_.decodes_in_progress.dec()
    del data
    decode_s = time.perf_counter() - decode_started
    metrics_.decode.observe(decode_s)
    fmt: OutputFormat = "jpeg" if output_format == "jpg" else output_format
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
        request_id=str(getattr(request.state, "request_id", "")),
        cost_s=round(estimate[0], 4),
        lane=lane,
        owner=caller.owner,
    )
    animated = image.animated
    del image
    job_info["job_id"] = job.job_id
    try:
        enqueued = await queue.enqueue(
            job, status_ttl_s=int(timeout + settings.result_ttl_s), max_ahead_s=max_ahead_s
        )
    except QueueFullError as exc:
        metrics_.jobs.labels(op, model, mode, "rejected").inc()
        raise _queue_full(settings, exc) from exc
    except QueueBusyError as exc:
        metrics_.jobs.labels(op, model, mode, "busy").inc()
        raise _queue_busy(lane, exc.ahead_s, exc.jobs, workers, estimate[0], timeout) from exc
    job.pixels = b""
    metrics_.queue_depth.set(enqueued.depth)
    metrics_.estimated_cost.labels(op, model).observe(estimate[0])
    # X-Model: the zoo model that made the image (a request without ?model= gets the
    # factor's default, which a re-evaluation may change; /styles has its metrics)
    extra_headers = {"X-Job-Id": job.job_id, "X-Model": model}
    if animated:
        extra_headers["X-Input-Frames"] = "first"
    if mode == "async":
        metrics_.jobs.labels(op, model, mode, "accepted").inc()
        url = _status_url(request, job.job_id)
        body = {"job_id": job.job_id, "status": "queued", "status_url": url}
        return JSONResponse(body, status_code=202, headers={"Location": url, **extra_headers})
    try:
        result = await queue.wait(job.job_id, job.deadline, abandoned=request.is_disconnected)
    except JobTimeoutError as exc:
        metrics_.jobs.labels(op, model, mode, "timeout").inc()
        raise ApiError(
            504,
            "timeout",
            f"no result within {timeout:g} s; the job was cancelled",
            job_id=job.job_id,
        ) from exc
    except JobAbandonedError as exc:
        metrics_.jobs.labels(op, model, mode, "client_gone").inc()
        raise ClientGoneError(f"waiting for job {job.job_id}; the job was cancelled") from exc
    except ResultMissingError as exc:
        metrics_.jobs.labels(op, model, mode, "failed").inc()
        raise ApiError(502, "result_missing", "the job finished but its result is gone") from exc
    metrics_.jobs.labels(op, model, mode, "ok" if result.ok else "failed").inc()
    if result.ok:
        metrics_.observe_timings(op, model, result.timings)
        metrics_.image_seconds.labels(op, model, mode).observe(time.perf_counter() - started)
    response = _result_response(
        result, job.job_id, decode_s=decode_s, started=started, retry_after=settings.retry_after_s
    )
    response.headers.update(extra_headers)
    return response


async def _queue_wait_limit(
    request: Request, own_s: float, timeout: float
) -> tuple[int, float | None]:
    """(live workers, the most estimated seconds of work that may be queued ahead of a job)
    for ``ADMIT_BY_QUEUE_WAIT``: the work ahead is shared among the live workers, and that
    wait plus the job's own estimate must fit in its timeout. None: no limit (the setting is
    off, or no worker is alive, so nothing can be estimated and the job waits for the next
    one, as ``/readyz`` says)."""
    if not _settings(request).admit_by_queue_wait:
        return 0, None
    workers = await _queue(request).live_workers(max_age_s=2.0)
    if workers == 0:
        return 0, None
    return workers, max(0.0, timeout - own_s) * workers


def _queue_busy(
    lane: Lane, ahead_s: float, jobs: int, workers: int, own_s: float, timeout: float
) -> ApiError:
    wait_s = ahead_s / max(1, workers)
    retry = max(1, math.ceil(wait_s + own_s - timeout))
    return ApiError(
        503,
        "queue_busy",
        f"the {jobs} job(s) ahead of this one in the {lane} lane need about {wait_s:.1f} s on "
        f"{workers} worker(s), and this one about {own_s:.1f} s more: past its {timeout:g} s "
        f"timeout. Retry later (Retry-After), or with a smaller image.",
        headers={"Retry-After": str(retry)},
        wait_s=round(wait_s, 3),
        estimated_s=round(own_s, 3),
        limit_s=timeout,
        workers=workers,
    )


def _queue_full(settings: ApiSettings, exc: QueueFullError) -> ApiError:
    return ApiError(
        503,
        "queue_full",
        str(exc),
        headers={"Retry-After": str(settings.retry_after_s)},
        queue_depth=exc.depth,
    )


def _count_async_answer(request: Request, status: JobStatus, result: JobResult) -> None:
    """Metrics of an async job, counted when its final answer is first fetched."""
    metrics_ = _metrics(request)
    op, model = status.op or "unknown", status.model or "unknown"
    metrics_.jobs.labels(op, model, "async", "ok" if result.ok else "failed").inc()
    if result.ok:
        metrics_.observe_timings(op, model, result.timings)
        if result.finished_at and status.enqueued_at:
            latency = max(0.0, result.finished_at - status.enqueued_at)
            metrics_.image_seconds.labels(op, model, "async").observe(latency)


def _status_url(request: Request, job_id: str) -> str:
    return str(request.app.url_path_for("get_job", job_id=job_id))


def _result_response(
    result: JobResult,
    job_id: str,
    *,
    decode_s: float | None = None,
    started: float | None = None,
    retry_after: int = 2,
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
        if status == 503:
            headers["Retry-After"] = str(retry_after)
        extra = {"reason": result.code} if result.code else {}
        return error_response(
            status, "job_failed", result.error or "the worker failed", headers, job_id=job_id,
            **extra,
        )  # fmt: skip
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
        app.state.queue = JobQueue.from_settings(settings)
        try:
            yield
        finally:
            await app.state.queue.close()

    # FastAPIOffline serves Swagger UI and ReDoc from files of the fastapi-offline package
    # (under /docs/assets), so /docs works on a machine without internet access.
    app = FastAPIOffline(
        title="Perceptual image transforms",
        summary="Fast style transfer and super-resolution (Johnson et al. 2016) over HTTP.",
        version="0.2.0",
        lifespan=lifespan,
        static_url="/docs/assets",
    )
    app.state.settings = settings
    app.state.metrics = metrics_
    app.state.catalog = ModelCatalog(settings.model_zoo_dir)
    app.state.keys = KeyStore.load(settings.api_keys.get_secret_value(), settings.api_keys_file)
    app.state.decode_slots = asyncio.Semaphore(settings.max_concurrent_decodes)
    install_error_handlers(app)
    app.include_router(router)
    install_web(app)
    # Built now, once: every request's parameter check reads it (_query_parameters_as_declared),
    # and built lazily it cost the first caller ~40 ms.
    app.openapi()
    # JSON and text for clients that accept gzip (GET /styles is ~50 KB of evaluation figures,
    # ~6 KB compressed); Starlette leaves PNG / JPEG / WebP answers alone by content type.
    app.add_middleware(GZipMiddleware, minimum_size=GZIP_MIN_BYTES, compresslevel=6)
    app.add_middleware(AccessGuard)
    app.add_middleware(RequestMiddleware, metrics=metrics_)
    return app

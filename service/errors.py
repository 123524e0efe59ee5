"""Error answers: every error is JSON ``{"error": <code>, "detail": <message or list>, ...}``.

Handlers cover the API's own errors, upload validation, FastAPI's request validation, routing
errors (404/405), Redis outages (503 + Retry-After) and, last, anything unexpected (500, logged):
a client never sees an HTML or plain-text error page.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.catalog import ManifestError
from service.images import ImageError

log = logging.getLogger("service")


class ApiError(Exception):
    """An error answer: status, a stable machine-readable code and a human-readable detail."""

    def __init__(
        self,
        status_code: int,
        error: str,
        detail: Any,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(f"{status_code} {error}: {detail}")
        self.status_code = status_code
        self.error = error
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def error_response(
    status_code: int,
    error: str,
    detail: Any,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"error": error, "detail": detail, **extra}
    return JSONResponse(jsonable_encoder(body), status_code=status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.error, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(ImageError)
    async def _image_error(_: Request, exc: ImageError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in exc.errors()
        ]
        return error_response(422, "invalid_request", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        return error_response(exc.status_code, code, exc.detail, dict(exc.headers or {}))

    @app.exception_handler(RedisError)
    async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("redis error on %s: %r", request.url.path, exc)
        retry = str(request.app.state.settings.retry_after_s)
        return error_response(
            503, "queue_unavailable", f"the job queue is unreachable: {exc}", {"Retry-After": retry}
        )

    @app.exception_handler(ManifestError)
    async def _manifest_error(_: Request, exc: ManifestError) -> JSONResponse:
        return error_response(503, "manifest_unavailable", str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", "unexpected server error")

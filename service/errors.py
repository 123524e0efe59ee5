"""Error answers: every error is JSON ``{"error": <code>, "detail": <message or list>, ...}``.

Handlers cover the API's own errors, upload validation, FastAPI's request validation, routing
errors (404/405), Redis outages (503 + Retry-After), a client that went away mid-request (logged
once as such and counted 499, or 408 when the server cut a too-slow upload off; never a 500 with
a traceback) and, last, anything unexpected (500, logged): a client never sees an HTML or
plain-text error page. Every 503 carries ``Retry-After``.
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
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.catalog import ManifestError
from service.images import ImageError
from service.server import TIMEOUT_STATE

CLIENT_CLOSED_REQUEST = 499
"""nginx's code for "the client closed the connection before the answer": never sent (there is
nobody to send it to), but what the access log and the request metrics record."""

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


class ClientGoneError(Exception):
    """The client disconnected while its request was served (upload aborted, or gone while
    its job was computed: the job has been cancelled)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def client_gone_response(request: Request, what: str) -> Response:
    """Record a vanished client as 499 (or 408 when the server timed the upload out)."""
    timed_out = request.scope.get("state", {}).get(TIMEOUT_STATE) == "body"
    if timed_out:
        log.info("upload timed out (too slow): %s", what, extra={"status": 408})
        return Response(status_code=408)
    log.info("client closed the connection: %s", what, extra={"status": CLIENT_CLOSED_REQUEST})
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = dict(exc.headers)
        if exc.status_code == 503:
            headers.setdefault("Retry-After", str(request.app.state.settings.retry_after_s))
        return error_response(exc.status_code, exc.error, exc.detail, headers, **exc.extra)

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, _: ClientDisconnect) -> Response:
        return client_gone_response(request, f"{request.method} {request.url.path} (upload)")

    @app.exception_handler(ClientGoneError)
    async def _client_gone(request: Request, exc: ClientGoneError) -> Response:
        return client_gone_response(request, exc.what)

    @app.exception_handler(ImageError)
    async def _image_error(_: Request, exc: ImageError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            entry = {k: v for k, v in err.items() if k in ("loc", "msg", "type")}
            allowed = _allowed_range(request, entry.get("loc", ()))
            if allowed:
                entry["allowed"] = allowed
            errors.append(entry)
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
    async def _manifest_error(request: Request, exc: ManifestError) -> JSONResponse:
        retry = str(request.app.state.settings.retry_after_s)
        return error_response(503, "manifest_unavailable", str(exc), {"Retry-After": retry})

    app.add_middleware(UnexpectedErrorMiddleware)


def declared_query_parameters(request: Request) -> list[dict[str, Any]] | None:
    """The query parameters the matched route declares, from its OpenAPI operation (the one
    place they are all listed, dependencies' included); None for a route the schema leaves
    out."""
    path = getattr(request.scope.get("route"), "path_format", None)
    operation = request.app.openapi().get("paths", {}).get(path, {}).get(request.method.lower())
    if operation is None:
        return None
    return [p for p in operation.get("parameters", []) if p.get("in") == "query"]


def _allowed_range(request: Request, loc: Any) -> str | None:
    """``"0 <= strength <= 1"`` for a bounded query parameter, read from the route's OpenAPI
    schema (the one source of the bounds): pydantic's message names only the bound that was
    crossed, and for ``strength=nan`` a bound that nan did not cross."""
    if len(loc) != 2 or loc[0] != "query":
        return None
    for param in declared_query_parameters(request) or []:
        if param.get("name") != loc[1]:
            continue
        schema = param.get("schema", {})
        for option in [schema, *schema.get("anyOf", [])]:
            low, high = option.get("minimum"), option.get("maximum")
            if low is not None or high is not None:
                return " <= ".join(str(v) for v in (low, loc[1], high) if v is not None)
    return None


class UnexpectedErrorMiddleware:
    """Anything no handler above knows: one log line with the traceback, a JSON 500.

    A middleware rather than ``exception_handler(Exception)``: Starlette runs that handler in
    its outermost middleware and then re-raises, so uvicorn logged every such error a second
    time; caught here, it is logged once."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path", ""))
            if not started:
                response = error_response(500, "internal_error", "unexpected server error")
                await response(scope, receive, send)

"""Who may do what: API keys (``service.keys``) and the per-client token bucket.

* Job routes (``POST /stylize``, ``POST /upscale``, ``GET`` / ``DELETE /jobs/{id}``) depend on
  ``job_caller``: with ``AUTH_REQUIRED`` a request needs ``Authorization: Bearer KEY`` or
  ``X-API-Key: KEY`` (401 ``missing_api_key`` / ``invalid_api_key``, with
  ``WWW-Authenticate``), and a key with the ``jobs`` or ``admin`` scope (403 ``forbidden``).
  Submissions then take a token from the caller's bucket in Redis (429 ``rate_limited`` with
  ``Retry-After``) when ``RATE_LIMIT_PER_MINUTE`` is set: per key name, or per client address
  without auth.
* ``/metrics`` (``METRICS_ACCESS``) and the docs (``DOCS_ACCESS``: ``/docs``, ``/redoc``,
  ``/openapi.json`` and the docs' assets) are checked by ``AccessGuard`` by path, since FastAPI
  serves the docs outside the router's dependencies.
* The page, ``/styles``, thumbnails and the health probes stay public: they reveal nothing a
  key protects, and the page must load before anyone types a key into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError, error_response
from service.keys import ApiKey, KeyStore

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key.")


@dataclass(frozen=True)
class Caller:
    """Who sent the request: the key's name (empty without auth) and the rate-limit bucket."""

    key: ApiKey | None
    bucket: str

    @property
    def owner(self) -> str:
        return self.key.name if self.key else ""


def _presented(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


def check_key(request: Request, scope: str, *, required: bool) -> ApiKey | None:
    """The request's key if it has ``scope``; raises 401/403 (``required``: no key is 401)."""
    keys: KeyStore = request.app.state.keys
    presented = _presented(request)
    challenge = {"WWW-Authenticate": 'Bearer realm="imgsvc"'}
    if presented is None:
        if not required:
            return None
        raise ApiError(
            401,
            "missing_api_key",
            "this route needs an API key: `Authorization: Bearer KEY` or `X-API-Key: KEY`",
            headers=challenge,
        )
    key = keys.find(presented)
    if key is None:
        raise ApiError(401, "invalid_api_key", "the API key is not known", headers=challenge)
    if not key.allows(scope):
        raise ApiError(
            403, "forbidden", f"the key {key.name!r} lacks the {scope!r} scope", scope=scope
        )
    return key


async def job_caller(
    request: Request,
    _bearer_credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    _api_key: Annotated[str | None, Depends(_header)],
) -> Caller:
    """The caller of a job route (the two security dependencies put the schemes in OpenAPI)."""
    settings = request.app.state.settings
    key = check_key(request, "jobs", required=settings.auth_required)
    client = request.client.host if request.client else "unknown"
    return Caller(key, f"key:{key.name}" if key else f"addr:{client}")


async def take_token(request: Request, caller: Caller) -> None:
    """One submission against the caller's token bucket (429 + Retry-After when empty)."""
    settings = request.app.state.settings
    if settings.rate_limit_per_minute <= 0:
        return
    decision = await request.app.state.queue.take_token(
        caller.bucket,
        rate_per_s=settings.rate_limit_per_minute / 60,
        burst=settings.rate_limit_burst,
    )
    if not decision.allowed:
        retry = max(1, math.ceil(decision.retry_after_s))
        raise ApiError(
            429,
            "rate_limited",
            f"more than {settings.rate_limit_per_minute:g} submissions a minute "
            f"(bursts of {settings.rate_limit_burst}); retry in {retry} s",
            headers={"Retry-After": str(retry)},
            limit_per_minute=settings.rate_limit_per_minute,
        )


class AccessGuard:
    """Path-level checks for what FastAPI serves outside its routes' dependencies."""

    DOCS_PREFIXES = ("/docs", "/redoc", "/openapi.json")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            settings = scope["app"].state.settings
            path: str = scope.get("path", "")
            needed = None
            if path == "/metrics" and settings.metrics_access != "public":
                needed = "admin"
            elif path.startswith(self.DOCS_PREFIXES) and settings.docs_access != "public":
                needed = "admin" if settings.docs_access == "admin" else "jobs"
            if needed is not None:
                try:
                    check_key(Request(scope), needed, required=True)
                except ApiError as exc:
                    response = error_response(
                        exc.status_code, exc.error, exc.detail, exc.headers, **exc.extra
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

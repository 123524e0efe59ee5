"""The HTTP server: uvicorn, with the connection-level limits uvicorn does not have.

uvicorn closes idle keep-alive connections, but a connection that never finishes its headers
(slowloris), trickles its body, or connects and stays silent holds a socket and a parser
forever - the application never even sees it. ``GuardedHttpToolsProtocol`` adds, per connection:

* a **header timeout**: the request line and headers must be complete ``HEADER_TIMEOUT_S`` after
  the connection opened (or after the previous response); otherwise 408 and close;
* a **body timeout**: the body must be complete ``BODY_TIMEOUT_S`` after the headers, plus one
  second per ``MIN_UPLOAD_BYTES_PER_S`` received, so a big upload on a good link has time and a
  10 B/s trickle is cut at ``BODY_TIMEOUT_S``; the application's pending read then ends as a
  client disconnect (``request.state`` says it was a timeout, so it is logged and counted 408);
* **JSON protocol errors**: a malformed request gets the service's error shape
  ``{"error": "bad_http_request", ...}`` instead of uvicorn's plain text.

It subclasses uvicorn's httptools protocol (pinned uvicorn, overriding its documented protocol
hooks ``connection_made``, ``on_message_begin``, ``on_headers_complete``, ``on_body``,
``on_message_complete``, ``on_response_complete`` and ``send_400_response``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import ApiSettings

log = logging.getLogger("service.server")

TIMEOUT_STATE = "imgsvc_timeout"
"""Key in the request's ASGI ``state`` set when the server cut the body off (value ``body``)."""


def _json_response(status: int, reason: str, error: str, detail: str) -> bytes:
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body timeouts (see the module doc)."""

    header_timeout_s: float = 15.0
    body_timeout_s: float = 15.0
    min_upload_bytes_per_s: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_started = 0.0
        self._body_bytes = 0

    # -- header timeout

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()
        self._body_started = time.monotonic()
        self._body_bytes = 0
        self._arm_body_timer(self.body_timeout_s)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._header_timer is None:
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served; its own body timer watches it
        log.warning(
            "closing connection from %s: request headers not complete within %g s",
            _peer(self.client),
            self.header_timeout_s,
            extra={"status": 408, "timeout": "headers"},
        )
        detail = f"request headers not received within {self.header_timeout_s:g} s"
        self.transport.write(_json_response(408, "Request Timeout", "request_timeout", detail))
        self.transport.close()

    # -- body timeout

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        super().on_message_complete()

    def _arm_body_timer(self, delay: float) -> None:
        self._cancel_body_timer()
        self._body_timer = self.loop.call_later(max(0.05, delay), self._body_timeout)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        allowed = self.body_timeout_s + self._body_bytes / self.min_upload_bytes_per_s
        remaining = self._body_started + allowed - time.monotonic()
        if remaining > 0:  # the upload has earned more time by what it sent
            self._arm_body_timer(remaining)
            return
        log.warning(
            "closing connection from %s: body incomplete after %.1f s (%d bytes received)",
            _peer(self.client),
            time.monotonic() - self._body_started,
            self._body_bytes,
            extra={"status": 408, "timeout": "body"},
        )
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            detail = (
                f"request body not received in time ({self._body_bytes} bytes in "
                f"{time.monotonic() - self._body_started:.1f} s)"
            )
            self.transport.write(_json_response(408, "Request Timeout", "request_timeout", detail))
            cycle.scope["state"][TIMEOUT_STATE] = "body"  # type: ignore[typeddict-item]
        if cycle is not None:
            # The application's pending read ends as a disconnect; what it sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    # -- protocol errors as JSON

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_json_response(400, "Bad Request", "bad_http_request", msg))
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"


def protocol_for(settings: ApiSettings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with this deployment's timeouts."""
    return type(
        "ConfiguredHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "body_timeout_s": settings.body_timeout_s,
            "min_upload_bytes_per_s": settings.min_upload_bytes_per_s,
        },
    )


def serve(app: FastAPI, settings: ApiSettings) -> None:
    """Run ``app`` on ``HOST``:``PORT`` until SIGTERM/SIGINT. Logging is the process's own
    (JSON, ``jobqueue.telemetry``): uvicorn's loggers propagate to it, and the access line is
    written by the app's middleware (with the request id, job id and latency)."""
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_for(settings),
        log_config=None,
        access_log=False,
        # Behind compose / a load balancer the client address comes from X-Forwarded-For.
        proxy_headers=True,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )

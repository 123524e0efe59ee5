"""Log lines that can be joined across processes: JSON, with the request and job they belong to.

A request id is taken from the caller (``X-Request-ID``, else the trace id of a W3C
``traceparent``) or made up, set in a context variable for everything the API does for that
request, carried in the ``Job`` and set again by the worker while it handles the job. Every log
record gets the ids present in its context (``ContextFilter``), so one ``grep`` of an id finds
the API's access line, the worker's compute line and any error in between.

Formatting is python-json-logger's; ``LOG_FORMAT=text`` gives plain lines for a terminal.
Lives in ``jobqueue`` because the ids travel in the job record, and both images ship it.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from jobqueue.protocol import REQUEST_ID_RE

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
JOB_ID: ContextVar[str] = ContextVar("job_id", default="")

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(headers: Mapping[str, str]) -> str:
    """The caller's ``X-Request-ID`` when well-formed, else the trace id of a valid
    ``traceparent`` (so a traced request keeps its trace id in our logs), else a new id."""
    given = headers.get("x-request-id", "").strip()
    if given and REQUEST_ID_RE.match(given):
        return given
    match = _TRACEPARENT.match(headers.get("traceparent", "").strip().lower())
    if match and match.group(1) != "0" * 32:
        return match.group(1)
    return new_request_id()


@contextmanager
def log_context(*, request_id: str | None = None, job_id: str | None = None) -> Iterator[None]:
    """Set the ids for the log lines written inside the block."""
    tokens = []
    if request_id is not None:
        tokens.append((REQUEST_ID, REQUEST_ID.set(request_id)))
    if job_id is not None:
        tokens.append((JOB_ID, JOB_ID.set(job_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Adds ``request_id`` / ``job_id`` from the context (unless the call passed its own via
    ``extra``) and the process role, to every record of every logger."""

    def __init__(self, process: str, **static: Any) -> None:
        super().__init__()
        self.process = process
        self.static = static

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None) and REQUEST_ID.get():
            record.request_id = REQUEST_ID.get()
        if not getattr(record, "job_id", None) and JOB_ID.get():
            record.job_id = JOB_ID.get()
        record.process_role = self.process
        for key, value in self.static.items():
            setattr(record, key, value)
        return True


def configure_logging(level: str, fmt: str, process: str, **static: Any) -> None:
    """One handler on the root logger for the whole process (uvicorn's loggers propagate to
    it), JSON by default. ``static`` fields (e.g. ``worker_id``) go on every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter(process, **static))
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True

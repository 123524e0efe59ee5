"""Compatibility: the API's queue client now lives in ``jobqueue.client`` (the package that owns
the whole Redis contract). ``JobQueue(settings)`` still builds one from ``ApiSettings``."""

from __future__ import annotations

from jobqueue.client import (
    Enqueued,
    JobAbandonedError,
    JobTimeoutError,
    QueueFullError,
    ResultMissingError,
)
from jobqueue.client import JobQueue as _JobQueue
from service.settings import ApiSettings

__all__ = [
    "Enqueued",
    "JobAbandonedError",
    "JobQueue",
    "JobTimeoutError",
    "QueueFullError",
    "ResultMissingError",
]


def JobQueue(settings: ApiSettings) -> _JobQueue:
    return _JobQueue.from_settings(settings)

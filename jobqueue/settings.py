"""Settings both processes read, with their defaults and validation in one place.

``service.settings.ApiSettings`` and ``worker.settings.WorkerSettings`` derive from
``QueueSettings``: the values the two sides must agree on (where Redis is, the key prefix, the
zoo, how long results live, the heartbeat and claim timing) are declared once, so a single
``.env`` configures a whole single-machine deployment and an inconsistent pair is refused at
start by either process rather than discovered as lost or stolen jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobqueue.protocol import Keys

PREFIX_PATTERN = r"^[A-Za-z0-9_\-.]{1,64}$"


def redacted_url(url: str) -> str:
    """``url`` without its password, for log lines: a Redis password travels in ``REDIS_URL``
    (``redis://:PASSWORD@host:6379/0``, how Kubernetes passes it from a Secret), and a log line
    must not carry it to whoever reads the logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


class QueueSettings(BaseSettings):
    """Read from the environment (upper-case names, no prefix) and an optional ``.env``."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding the job streams and results. `python -m service.launch` "
        "starts a private redis-server instead when this is not set.",
    )
    queue_prefix: str = Field(
        "imgsvc",
        pattern=PREFIX_PATTERN,
        description="Prefix of every Redis key, so deployments can share one Redis; API and "
        "workers must use the same.",
    )
    model_zoo_dir: Path | None = Field(
        None, description="Zoo folder whose manifest lists the models (default: the package's)."
    )
    result_ttl_s: int = Field(
        600,
        ge=1,
        description="Lifetime of results, job status records and cancel markers.",
    )
    heartbeat_interval_s: float = Field(
        2.0, gt=0, description="Worker heartbeat period; the heartbeat key lives 3 periods."
    )
    claim_idle_ms: int = Field(
        30_000,
        ge=10,
        description="A job pending this long on a worker that stopped refreshing it is taken "
        "over by another; must be at least 2 x HEARTBEAT_INTERVAL_S.",
    )
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["json", "text"] = Field(
        "json",
        description="json: one JSON object per line (request_id, job_id...); text: "
        "for reading in a terminal.",
    )

    @model_validator(mode="after")
    def _claim_after_heartbeat(self) -> QueueSettings:
        # A live worker refreshes its in-flight jobs every heartbeat; a claim timeout shorter
        # than two heartbeats would let other workers steal jobs that are still being computed.
        if self.claim_idle_ms < 2000 * self.heartbeat_interval_s:
            raise ValueError(
                f"CLAIM_IDLE_MS ({self.claim_idle_ms}) must be at least 2 x "
                f"HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s} s)"
            )
        return self

    @property
    def keys(self) -> Keys:
        return Keys(self.queue_prefix)

    @property
    def heartbeat_ttl_ms(self) -> int:
        return int(self.heartbeat_interval_s * 3000)

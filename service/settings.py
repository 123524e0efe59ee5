"""API settings, read from the environment and an optional ``.env`` file.

Names are the upper-case field names (``REDIS_URL``, ``MAX_UPLOAD_BYTES``, ...), shared with the
worker where both sides must agree (``REDIS_URL``, ``QUEUE_PREFIX``, ``MODEL_ZOO_DIR``), so one
``.env`` configures a whole single-machine deployment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobqueue.protocol import Keys

MIB = 1024 * 1024


class ApiSettings(BaseSettings):
    """Everything the API process can be told; defaults suit ``make run`` on one machine."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding the job stream and results. `python -m service.launch` starts "
        "a private redis-server instead when this is not set.",
    )
    queue_prefix: str = Field(
        "imgsvc",
        pattern=r"^[A-Za-z0-9_\-.]{1,64}$",
        description="Prefix of every Redis key, so deployments can share one Redis.",
    )
    model_zoo_dir: Path | None = Field(
        None, description="Zoo folder whose manifest lists the models (default: the package's)."
    )
    host: str = Field("127.0.0.1", description="Interface the API binds (0.0.0.0 in a container).")
    port: int = Field(8000, ge=1, le=65535, description="API port.")
    max_upload_bytes: int = Field(20 * MIB, ge=1, description="Largest accepted upload (413).")
    max_style_pixels: int = Field(
        4096 * 4096, ge=1, description="Largest input of /stylize in pixels, width x height (413)."
    )
    max_upscale_output_side: int = Field(
        8192, ge=1, description="Largest side of an /upscale result; input side x factor (413)."
    )
    max_queue_depth: int = Field(
        64,
        ge=1,
        description="Most jobs in the stream (queued or in flight); at this depth new work gets "
        "503 + Retry-After. Bounds Redis memory too: a job carries its decoded pixels.",
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="How long a synchronous request waits for its result (504)."
    )
    async_job_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of a ?mode=async job: not started after it, it fails."
    )
    result_ttl_s: int = Field(
        600,
        ge=1,
        description="Lifetime of cancel markers and of job status records after the deadline. "
        "Results expire after the worker's RESULT_TTL_S: give both the same value.",
    )
    retry_after_s: int = Field(
        2, ge=0, description="Retry-After seconds sent with 503 (queue full, Redis down)."
    )
    redis_timeout_s: float = Field(
        5.0, gt=0, description="Socket timeout of one Redis command (blocking waits are chunked)."
    )
    wait_chunk_s: float = Field(
        1.0, gt=0, le=30, description="Longest single BLPOP while waiting, so Redis loss is seen."
    )

    @model_validator(mode="after")
    def _chunk_below_socket_timeout(self) -> ApiSettings:
        # A BLPOP longer than the socket timeout would be cut off by the client as an error.
        if self.wait_chunk_s >= self.redis_timeout_s:
            raise ValueError("WAIT_CHUNK_S must be shorter than REDIS_TIMEOUT_S")
        return self

    @property
    def keys(self) -> Keys:
        return Keys(self.queue_prefix)

    def max_upscale_input_side(self, factor: int) -> int:
        return self.max_upscale_output_side // factor

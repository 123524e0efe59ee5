"""API settings, read from the environment and an optional ``.env`` file.

Names are the upper-case field names (``REDIS_URL``, ``MAX_UPLOAD_BYTES``, ...). What the API
shares with the workers (``REDIS_URL``, ``QUEUE_PREFIX``, ``MODEL_ZOO_DIR``, ``RESULT_TTL_S``,
``HEARTBEAT_INTERVAL_S``, ``CLAIM_IDLE_MS``, ``LOG_LEVEL``, ``LOG_FORMAT``) is declared and
validated once, in ``jobqueue.settings.QueueSettings``, so one ``.env`` configures a whole
single-machine deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from jobqueue.settings import QueueSettings

MIB = 1024 * 1024


class ApiSettings(QueueSettings):
    """Everything the API process can be told; defaults suit ``make run`` on one machine."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

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
        description="Most jobs in the lanes (queued or in flight); at this depth new work gets "
        "503 + Retry-After, before its upload is decoded. Bounds Redis memory too: a job "
        "carries its decoded pixels.",
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="How long a synchronous request waits for its result (504)."
    )
    async_job_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of a ?mode=async job: not finished by then, it fails."
    )
    admission_headroom: float = Field(
        0.5,
        gt=0,
        le=1,
        description="A job is admitted only if its estimated compute (output megapixels x the "
        "model's measured seconds per megapixel) fits in this fraction of its timeout; the "
        "rest of the time is left for queueing. Otherwise 413 job_too_expensive.",
    )
    admit_by_queue_wait: bool = Field(
        True,
        description="Refuse a job (503 queue_busy + Retry-After) when the estimated compute "
        "queued ahead of it in its lane, shared among the live workers, plus its own would not "
        "finish within its timeout: the caller hears it at once instead of a 504 after "
        "REQUEST_TIMEOUT_S.",
    )
    bulk_lane_cost_s: float = Field(
        2.0,
        ge=0,
        description="Jobs estimated at this many seconds or more go to the bulk lane, which "
        "workers serve after the interactive one (and pause for it between forward passes).",
    )
    assumed_seconds_per_megapixel: float = Field(
        10.0,
        gt=0,
        description="Cost used for a model no worker has measured yet (a slow CPU's figure, "
        "so the first big job is not admitted on optimism).",
    )
    max_concurrent_decodes: int = Field(
        2,
        ge=1,
        description="Uploads decoded at the same time; the others wait holding only their "
        "compressed bytes (a decoded image is up to 48 MB per 4096² RGB upload).",
    )
    header_timeout_s: float = Field(
        15.0,
        gt=0,
        description="A connection must deliver a request's complete headers within this "
        "(silent and slow-header connections are closed with 408).",
    )
    body_timeout_s: float = Field(
        15.0,
        gt=0,
        description="A request body must arrive within this plus one second per "
        "MIN_UPLOAD_BYTES_PER_S received (a trickling upload is closed with 408).",
    )
    min_upload_bytes_per_s: int = Field(
        64 * 1024, ge=1, description="Upload rate an upload must keep after BODY_TIMEOUT_S."
    )
    retry_after_s: int = Field(
        2, ge=0, description="Retry-After seconds sent with 503 (queue full, Redis down)."
    )
    redis_timeout_s: float = Field(
        5.0, gt=0, description="Socket timeout of one Redis command (blocking waits are chunked)."
    )
    wait_chunk_s: float = Field(
        1.0,
        gt=0,
        le=30,
        description="Longest single BLPOP while waiting, so Redis loss and a disconnected "
        "client are noticed.",
    )
    auth_required: bool = Field(
        False,
        description="Job routes (POST /stylize, /upscale, /jobs/...) need an API key "
        "(401 without, 403 with a key lacking the scope).",
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="Comma list of NAME:KEY[:SCOPE+SCOPE] (scopes: jobs, admin; default jobs); "
        "for development - prefer API_KEYS_FILE.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of hashed keys, one `NAME sha256:HEX [SCOPE,...]` a line "
        "(`python -m service.keys new NAME` makes one).",
    )
    metrics_access: Literal["public", "admin"] = Field(
        "public", description="Who may read /metrics: anyone, or keys with the admin scope."
    )
    docs_access: Literal["public", "key", "admin"] = Field(
        "public", description="Who may read /docs, /redoc and /openapi.json."
    )
    rate_limit_per_minute: float = Field(
        0.0,
        ge=0,
        description="Job submissions per minute per API key (per client address without "
        "auth), as a token bucket in Redis; 0 = no limit. Over it: 429 + Retry-After.",
    )
    rate_limit_burst: int = Field(20, ge=1, description="Token bucket size (submissions).")

    @model_validator(mode="after")
    def _consistent(self) -> ApiSettings:
        # A BLPOP longer than the socket timeout would be cut off by the client as an error.
        if self.wait_chunk_s >= self.redis_timeout_s:
            raise ValueError("WAIT_CHUNK_S must be shorter than REDIS_TIMEOUT_S")
        needs_keys = (
            self.auth_required or self.metrics_access != "public" or self.docs_access != "public"
        )
        if needs_keys and not (self.api_keys.get_secret_value() or self.api_keys_file):
            raise ValueError(
                "AUTH_REQUIRED (or restricted metrics/docs) needs API_KEYS or API_KEYS_FILE"
            )
        return self

    def max_upscale_input_side(self, factor: int) -> int:
        return self.max_upscale_output_side // factor

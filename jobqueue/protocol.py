"""The contract between the API replicas and the workers, as it lives in Redis.

Both sides import this module and nothing else of each other, so the wire format is defined once.
It is torch-free on purpose: the API image does not ship torch.

Flow of one job::

    API  --XADD {prefix}:jobs-->  stream (consumer group "workers")
    worker  XREADGROUP / XAUTOCLAIM  -> compute -> SET {prefix}:result:{id} (TTL)
            -> RPUSH {prefix}:done:{id} (TTL) -> XACK + XDEL
    API  BLPOP {prefix}:done:{id}  -> GET {prefix}:result:{id}

The job is acknowledged only after its result is stored (at-least-once). A caller that gives up
sets {prefix}:cancel:{id} so that no worker computes it for nobody; the job's own ``deadline``
field does the same for callers that died without saying so.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

Operation = Literal["stylize", "upscale"]
OutputFormat = Literal["png", "jpeg", "webp"]

CONSUMER_GROUP = "workers"


@dataclass(frozen=True)
class Keys:
    """Redis key names under one prefix, so several deployments can share a Redis."""

    prefix: str = "imgsvc"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}:dead"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def status(self, job_id: str) -> str:
        return f"{self.prefix}:status:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def heartbeat_pattern(self) -> str:
        return f"{self.prefix}:worker:*"


@dataclass(frozen=True)
class StyleControls:
    """How a style job is conditioned: the conditional net's slot weights, strength and
    colour keeping (``model_zoo.styles`` resolves them from names; the worker applies them)."""

    slots: tuple[tuple[int, float], ...] = ()
    """(slot index, weight) summing to 1; empty for a single-style net."""
    identity: int | None = None
    """The net's identity slot (what ``strength`` < 1 mixes in); None: blend pixels."""
    strength: float = 1.0
    keep_colors: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {
                "slots": [list(pair) for pair in self.slots],
                "identity": self.identity,
                "strength": self.strength,
                "keep_colors": self.keep_colors,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> StyleControls:
        data = json.loads(text)
        controls = cls(
            slots=tuple((int(i), float(w)) for i, w in data.get("slots", [])),
            identity=None if data.get("identity") is None else int(data["identity"]),
            strength=float(data.get("strength", 1.0)),
            keep_colors=bool(data.get("keep_colors", False)),
        )
        if not 0.0 <= controls.strength <= 1.0:
            raise ValueError(f"strength {controls.strength} outside [0, 1]")
        if any(i < 0 or w < 0 for i, w in controls.slots):
            raise ValueError("negative slot index or weight")
        return controls


@dataclass
class Job:
    """One image to transform. Pixels travel decoded (uint8, HxWxC row-major, C=3 or 4) so the
    worker never re-parses untrusted bytes: the API has already validated them."""

    model: str
    op: Operation
    width: int
    height: int
    channels: int
    pixels: bytes
    output_format: OutputFormat = "png"
    deadline: float = 0.0
    controls: StyleControls = field(default_factory=StyleControls)
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued_at: float = field(default_factory=time.time)

    def to_fields(self) -> dict[str, bytes | str]:
        return {
            "job_id": self.job_id,
            "model": self.model,
            "op": self.op,
            "width": str(self.width),
            "height": str(self.height),
            "channels": str(self.channels),
            "pixels": self.pixels,
            "output_format": self.output_format,
            "deadline": repr(self.deadline),
            "enqueued_at": repr(self.enqueued_at),
            "controls": self.controls.to_json(),
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Job:
        """Parse a stream entry; raises ``ValueError`` on a malformed one (dead-letter it)."""
        try:
            text = {k.decode(): v for k, v in fields.items()}
            job = cls(
                job_id=text["job_id"].decode(),
                model=text["model"].decode(),
                op=text["op"].decode(),  # type: ignore[arg-type]
                width=int(text["width"]),
                height=int(text["height"]),
                channels=int(text["channels"]),
                pixels=text["pixels"],
                output_format=text["output_format"].decode(),  # type: ignore[arg-type]
                deadline=float(text["deadline"]),
                enqueued_at=float(text["enqueued_at"]),
                controls=StyleControls.from_json(text["controls"].decode())
                if "controls" in text
                else StyleControls(),
            )
        except (KeyError, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise ValueError(f"malformed job entry: {exc!r}") from exc
        if job.channels not in (3, 4) or len(job.pixels) != job.width * job.height * job.channels:
            raise ValueError("pixel buffer does not match width x height x channels")
        return job


@dataclass
class JobResult:
    """What a worker stores for a job: either an encoded image or an error for the caller.

    ``timings`` holds seconds spent in ``queue``, ``compute`` and ``encode`` (for Server-Timing),
    plus ``batch_size`` of the forward pass that produced it.
    """

    job_id: str
    ok: bool
    content_type: str = ""
    image: bytes = b""
    error: str = ""
    status_code: int = 200
    timings: dict[str, float] = field(default_factory=dict)

    def encode(self) -> bytes:
        header = json.dumps(
            {
                "job_id": self.job_id,
                "ok": self.ok,
                "content_type": self.content_type,
                "error": self.error,
                "status_code": self.status_code,
                "timings": self.timings,
            }
        ).encode()
        return len(header).to_bytes(4, "big") + header + self.image

    @classmethod
    def decode(cls, blob: bytes) -> JobResult:
        size = int.from_bytes(blob[:4], "big")
        header = json.loads(blob[4 : 4 + size])
        return cls(image=blob[4 + size :], **header)

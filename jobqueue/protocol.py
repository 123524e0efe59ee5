"""The vocabulary of the contract between the API replicas and the workers, as it lives in Redis.

Both sides import this module (and ``jobqueue.client`` / ``jobqueue.consumer``, which speak it)
and nothing else of each other, so the wire format is defined once. It is torch-free on purpose:
the API image does not ship torch.

Flow of one job::

    API  --XADD {prefix}:jobs[:bulk]-->  stream of its lane (consumer group "workers")
    worker  XREADGROUP / XAUTOCLAIM  -> compute -> SET {prefix}:result:{id} (TTL)
            -> RPUSH {prefix}:done:{id} (TTL) -> XACK + XDEL     (one MULTI/EXEC)
    API  BLPOP {prefix}:done:{id}  -> GET {prefix}:result:{id}

The job is acknowledged only after its result is stored (at-least-once). A caller that gives up
(504, disconnected, ``DELETE /jobs/{id}``) sets {prefix}:cancel:{id}; workers check it before
computing and between forward passes, so nobody computes for nobody. The job's own ``deadline``
does the same for callers that died without saying so.

**Lanes.** A job whose estimated cost (output megapixels x the model's measured seconds per
megapixel, ``ModelCost``) is at least the API's ``BULK_LANE_COST_S`` goes to the ``bulk``
stream; the rest to ``interactive``. Workers read ``interactive`` first, take ``bulk`` jobs one at
a time, and between the forward passes of a bulk job compute any interactive job that arrived,
so a big job delays small ones by at most one forward pass.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

Operation = Literal["stylize", "upscale"]
ModelKind = Literal["style", "sr"]
OutputFormat = Literal["png", "jpeg", "webp"]
Lane = Literal["interactive", "bulk"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]

OPERATIONS: dict[str, ModelKind] = {"stylize": "style", "upscale": "sr"}
"""Which kind of model each operation needs (a style net cannot upscale, and the reverse)."""
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
LANES: tuple[Lane, ...] = get_args(Lane)
FINAL_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})

CONSUMER_GROUP = "workers"

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
"""A job id: 32 lower-case hex digits (a uuid4). The API's ``/jobs/{id}`` route and the worker's
check of a malformed entry's id use this one pattern."""
JOB_ID_RE = re.compile(JOB_ID_PATTERN)
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/+=\-]{0,127}$"
"""A caller's ``X-Request-ID`` is taken as is when it matches this (printable, no spaces, at most
128 characters: safe in a log line and a Redis value); anything else is replaced."""
REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Keys:
    """Redis key names under one prefix, so several deployments can share a Redis."""

    prefix: str = "imgsvc"

    @property
    def stream(self) -> str:
        """The interactive lane (the stream every job used before lanes existed)."""
        return f"{self.prefix}:jobs"

    @property
    def bulk_stream(self) -> str:
        return f"{self.prefix}:jobs:bulk"

    def lane_stream(self, lane: Lane) -> str:
        return self.bulk_stream if lane == "bulk" else self.stream

    @property
    def streams(self) -> tuple[str, str]:
        return (self.stream, self.bulk_stream)

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def costs(self) -> str:
        """Hash: model name -> ``ModelCost`` JSON, written by workers, read by the API."""
        return f"{self.prefix}:costs"

    @property
    def backlog(self) -> str:
        """Sorted set of the jobs not yet answered: member ``backlog_member(...)``, score the
        job's deadline. Added by the enqueue, removed with the acknowledgement; members past
        their deadline are pruned by every enqueue and every read (their jobs are never
        computed), so an entry a crashed writer left behind cannot inflate the estimate for
        longer than one timeout."""
        return f"{self.prefix}:backlog"

    def cost_probe(self, model: str, fingerprint: str) -> str:
        """Held (with a TTL) by the one worker probing ``model`` on hardware ``fingerprint``;
        workers starting with it wait for its figure instead of probing at the same time."""
        return f"{self.prefix}:costprobe:{model}:{fingerprint}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def status(self, job_id: str) -> str:
        return f"{self.prefix}:status:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def reported(self, job_id: str) -> str:
        """Set once by the API replica that first served an async job's final answer, so the
        job is counted in the metrics exactly once however often it is polled."""
        return f"{self.prefix}:reported:{job_id}"

    def quota(self, client: str) -> str:
        return f"{self.prefix}:quota:{client}"

    def heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def heartbeat_pattern(self) -> str:
        return f"{self.prefix}:worker:*"


def backlog_member(lane: str, cost_s: str, job_id: str) -> str:
    """The backlog set's member for a job: its lane, its estimated seconds exactly as the
    stream entry's ``cost_s`` field spells them (so the worker rebuilds the same member from
    the entry it acknowledges) and its id."""
    return f"{lane}|{cost_s}|{job_id}"


def lanes_ahead(lane: Lane) -> tuple[Lane, ...]:
    """The lanes whose jobs a new job of ``lane`` waits behind: a bulk job behind every lane,
    an interactive one behind its own only (workers pause bulk jobs for interactive ones)."""
    return LANES if lane == "bulk" else (lane,)


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
    job_id: str = field(default_factory=new_job_id)
    enqueued_at: float = field(default_factory=time.time)
    request_id: str = ""
    """The HTTP request that submitted the job (``X-Request-ID`` / ``traceparent``), so worker
    log lines join the API's."""
    cost_s: float = 0.0
    """The API's estimate of the compute time, from the model's measured cost."""
    lane: Lane = "interactive"
    owner: str = ""
    """Name of the API key that submitted the job (empty without auth); only it may poll or
    cancel the job."""

    @property
    def output_pixels(self) -> int:
        """Pixels of the result (before the factor of an SR model is known: input pixels)."""
        return self.width * self.height

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
            "request_id": self.request_id,
            "cost_s": repr(self.cost_s),
            "lane": self.lane,
            "owner": self.owner,
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Job:
        """Parse a stream entry; raises ``ValueError`` on a malformed one (dead-letter it).
        Fields added later (controls, request id, cost, lane, owner) are optional, so entries
        queued by an older API are still served."""
        try:
            text = {k.decode(): v for k, v in fields.items()}
            lane = text.get("lane", b"interactive").decode()
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
                request_id=text.get("request_id", b"").decode(),
                cost_s=float(text.get("cost_s", b"0")),
                lane=lane if lane in LANES else "interactive",  # type: ignore[arg-type]
                owner=text.get("owner", b"").decode(),
            )
        except (KeyError, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise ValueError(f"malformed job entry: {exc!r}") from exc
        if not JOB_ID_RE.match(job.job_id):
            raise ValueError(f"malformed job entry: job id {job.job_id[:40]!r}")
        if job.channels not in (3, 4) or len(job.pixels) != job.width * job.height * job.channels:
            raise ValueError("pixel buffer does not match width x height x channels")
        return job


@dataclass
class JobResult:
    """What a worker stores for a job: either an encoded image or an error for the caller.

    ``timings`` holds seconds spent in ``queue``, ``compute`` and ``encode`` (for Server-Timing),
    plus ``batch_size`` of the forward pass that produced it. ``finished_at`` (epoch s) lets the
    API measure an async job's end-to-end latency when it is fetched later.
    """

    job_id: str
    ok: bool
    content_type: str = ""
    image: bytes = b""
    error: str = ""
    status_code: int = 200
    timings: dict[str, float] = field(default_factory=dict)
    finished_at: float = 0.0
    code: str = ""
    """Machine-readable error code for the caller (``deadline_exceeded``, ``job_abandoned``...);
    empty means the generic ``job_failed``."""

    def encode(self) -> bytes:
        header = json.dumps(
            {
                "job_id": self.job_id,
                "ok": self.ok,
                "content_type": self.content_type,
                "error": self.error,
                "status_code": self.status_code,
                "timings": self.timings,
                "finished_at": self.finished_at,
                "code": self.code,
            }
        ).encode()
        return len(header).to_bytes(4, "big") + header + self.image

    @classmethod
    def decode(cls, blob: bytes) -> JobResult:
        size = int.from_bytes(blob[:4], "big")
        header = json.loads(blob[4 : 4 + size])
        known = {f.name for f in fields(cls)}
        return cls(image=blob[4 + size :], **{k: v for k, v in header.items() if k in known})


@dataclass
class JobStatus:
    """The status record of a job (``{prefix}:status:{id}``, JSON), written by the API at
    submission and by the worker at every change of state; what ``GET /jobs/{id}`` reports while
    there is no result yet."""

    state: JobState
    job_id: str = ""
    op: str = ""
    model: str = ""
    lane: Lane = "interactive"
    deadline: float = 0.0
    enqueued_at: float = 0.0
    updated_at: float = field(default_factory=time.time)
    request_id: str = ""
    owner: str = ""
    cost_s: float = 0.0
    worker: str = ""

    @classmethod
    def for_job(cls, job: Job, state: JobState, worker: str = "") -> JobStatus:
        return cls(
            state=state,
            job_id=job.job_id,
            op=job.op,
            model=job.model,
            lane=job.lane,
            deadline=job.deadline,
            enqueued_at=job.enqueued_at,
            request_id=job.request_id,
            owner=job.owner,
            cost_s=job.cost_s,
            worker=worker,
        )

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> JobStatus:
        """Parse a record; a bare state string (what older workers wrote) is accepted."""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {"state": text.strip() or "queued"}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ModelCost:
    """A worker's measured speed for one model: seconds of compute per output megapixel.

    Measured at warm-up (a forward pass at a representative size) and then refined from the
    jobs it computes (an exponential average, big jobs only: small ones are dominated by fixed
    overhead). The API multiplies it by a job's output megapixels to admit, refuse or lane it.

    Images the worker cuts into tiles (``tiled``) have a cost of
    their own: tiles run in PyTorch with borrowed instance-norm statistics, an extra
    statistics pass and overlap, while whole images of a style net run in OpenVINO; on the
    2-core CPU a 1536 px output cost 3.0 s per megapixel tiled against 0.42 whole (style net)
    and 2.6 against 1.0 (x4), so one figure for both admitted big jobs at a third or less of
    their real time.
    """

    model: str
    seconds_per_megapixel: float
    samples: int = 1
    worker: str = ""
    device: str = ""
    updated_at: float = field(default_factory=time.time)
    tiled_seconds_per_megapixel: float = 0.0
    """The same for tiled images; 0: not measured yet (the whole-image figure stands in)."""
    tiled_samples: int = 0
    tile_input_side: int = 0
    """The largest input side the worker runs whole; 0: it never tiles this model."""
    whole_max_pixels: int = 0
    """... unless the input has at most this many pixels (whole images in OpenVINO)."""
    fingerprint: str = ""
    """What the figure holds for (``worker.costs.fingerprint``: the weights, how the engine
    runs them, on what hardware); a starting worker with the same one adopts the figure instead
    of probing. Empty: not known, never adopted."""

    def tiled(self, width: int, height: int) -> bool:
        """Whether the worker runs a ``width`` x ``height`` input as tiles (``Engine.tiling``)."""
        longest = max(width, height)
        return 0 < self.tile_input_side < longest and width * height > self.whole_max_pixels

    def seconds_per_megapixel_at(self, width: int, height: int) -> float:
        """The cost per output megapixel of a ``width`` x ``height`` input."""
        if self.tiled(width, height) and self.tiled_seconds_per_megapixel > 0:
            return self.tiled_seconds_per_megapixel
        return self.seconds_per_megapixel

    def estimate(self, output_pixels: int, width: int = 0, height: int = 0) -> float:
        return self.seconds_per_megapixel_at(width, height) * output_pixels / 1e6

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> ModelCost:
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def decode_costs(raw: dict[Any, Any]) -> dict[str, ModelCost]:
    """The costs hash (``Keys.costs``) by model; an entry that does not decode is skipped (a
    newer or older worker may write fields this one does not know)."""
    costs = {}
    for name, value in raw.items():
        try:
            costs[name.decode() if isinstance(name, bytes) else str(name)] = ModelCost.decode(value)
        except (ValueError, TypeError):
            continue
    return costs

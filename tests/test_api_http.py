"""The API over real HTTP (uvicorn subprocess) and a real Redis, without a worker.

Everything that must be answered before a job reaches a worker: every bad input, the queue's
backpressure and timeout, async submission, Redis loss and recovery, readiness, metrics, docs.
Tight limits (64 x 64 style input, 512 px upscale output, 100 kB uploads) keep it all tiny.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from jobqueue.protocol import Job, Keys
from service.launch import Child, free_port, start_api, wait_http

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PREFIX = "apitest"
MAX_UPLOAD = 100_000
RETRY_AFTER = 3


@dataclass
class Api:
    url: str
    child: Child
    log: Path
    redis_url: str
    keys: Keys

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)


@pytest.fixture(scope="module")
def api(
    redis_instance: object, tiny_zoo_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    redis_url = redis_instance.url  # type: ignore[attr-defined]
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "QUEUE_PREFIX": PREFIX,
        "MODEL_ZOO_DIR": str(tiny_zoo_template),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "MAX_STYLE_PIXELS": str(64 * 64),
        "MAX_UPSCALE_OUTPUT_SIDE": "512",
        "MAX_QUEUE_DEPTH": "2",
        "REQUEST_TIMEOUT_S": "1",
        "RETRY_AFTER_S": str(RETRY_AFTER),
        "WAIT_CHUNK_S": "0.25",
        "REDIS_TIMEOUT_S": "2",
    }
    with open(log, "wb") as out:
        child = start_api(env, output=out, cwd=str(REPO))
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", 60, child)
            yield Api(f"http://127.0.0.1:{port}", child, log, redis_url, Keys(PREFIX))
        finally:
            child.stop()
    # uvicorn shuts down gracefully, then re-raises SIGTERM: -15 is its clean exit.
    assert child.process.returncode in (0, -15), log.read_text()[-3000:]
    assert "Finished server process" in log.read_text()


@pytest.fixture()
def client(api: Api, redis_server: str) -> Iterator[httpx.Client]:
    """An HTTP client; Redis has been emptied and is running (``redis_server``)."""
    assert redis_server == api.redis_url
    with api.client() as http:
        yield http


def png(size: tuple[int, int] = (16, 16), mode: str = "RGB", seed: int = 0) -> bytes:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


def jpeg(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, "JPEG")
    return buf.getvalue()


def bomb_png(side: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# A PNG cut after its header, and a PNG that says it is 0 x 0: broken PNGs (400), not some
# unsupported format (415, as before issue 15).
HEADER_ONLY_PNG = b"\x89PNG\r\n\x1a\n" + png_chunk(
    b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)
)
ZERO_PNG = (
    b"\x89PNG\r\n\x1a\n"
    + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))
    + png_chunk(b"IDAT", zlib.compress(b""))
    + png_chunk(b"IEND", b"")
)


def multipart(data: bytes, field: str = "image") -> dict[str, tuple[str, bytes, str]]:
    return {field: ("upload.png", data, "image/png")}


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert body["error"] == code, body
    assert body["detail"], body
    return body


def submit_async(client: httpx.Client) -> httpx.Response:
    return client.post("/stylize?style=mosaic&mode=async", files=multipart(png()))


def stream_length(api: Api) -> int:
    return int(api.redis().xlen(api.keys.stream))


# --- plain endpoints ---------------------------------------------------------------------------


def test_healthz_styles_and_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    catalog = client.get("/styles").json()
    assert {m["name"] for m in catalog["styles"]} == {"tiny_style", "mosaic"}
    assert {m["name"]: m["factor"] for m in catalog["upscalers"]} == {"x4": 4, "x8": 8}
    style = catalog["styles"][0]
    assert style["kind"] == "style" and style["arch"]["base_channels"] == 8
    assert style["sha256"] and "weights" not in style
    spec = client.get("/openapi.json").json()
    for path in ("/stylize", "/upscale", "/jobs/{job_id}", "/styles", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    body = spec["paths"]["/stylize"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/*" in body
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("path", ["/openapi.json", "/styles"])
def test_json_is_gzipped_for_clients_that_accept_it(client: httpx.Client, path: str) -> None:
    plain = client.get(path, headers={"Accept-Encoding": "identity"})
    packed = client.get(path, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers
    if len(plain.content) < 1024:  # not worth it: sent as it is
        assert "content-encoding" not in packed.headers
        return
    assert packed.headers["content-encoding"] == "gzip" and packed.json() == plain.json()
    assert int(packed.headers["content-length"]) < len(plain.content) / 3


def test_readyz_without_worker_is_503(client: httpx.Client) -> None:
    body = assert_error(client.get("/readyz"), 503, "not_ready")
    assert body["redis"] is True and body["workers"] == 0
    assert "worker" in str(body["detail"])


def test_api_process_does_not_import_torch() -> None:
    code = "import sys, service.app, service.launch; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


# --- bad input: a clear 4xx JSON, and nothing reaches the queue ---------------------------------


def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


BAD_UPLOADS = [
    # (name, path, request kwargs, status, error code)
    ("empty raw body", "/stylize?style=mosaic",
     {"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty_body"),
    ("empty multipart file", "/stylize?style=mosaic", {"files": multipart(b"")}, 400, "empty_body"),
    ("not an image", "/stylize?style=mosaic",
     {"files": multipart(b"this is plain text, not pixels")}, 415, "unsupported_image"),
    ("truncated png", "/stylize?style=mosaic",
     {"files": multipart(_truncated(png((48, 48))))}, 400, "corrupt_image"),
    ("header-only png", "/stylize?style=mosaic", {"files": multipart(HEADER_ONLY_PNG)},
     400, "corrupt_image"),
    ("zero-sized png", "/stylize?style=mosaic", {"files": multipart(ZERO_PNG)},
     400, "corrupt_image"),
    ("png signature only", "/upscale?factor=4", {"files": multipart(HEADER_ONLY_PNG[:8])},
     400, "corrupt_image"),
    ("truncated jpeg", "/upscale?factor=4",
     {"content": _truncated(jpeg((48, 48))), "headers": {"content-type": "image/jpeg"}},
     400, "corrupt_image"),
    ("unsupported content type", "/stylize?style=mosaic",
     {"content": b'{"image": 1}', "headers": {"content-type": "application/json"}},
     415, "unsupported_media_type"),
    ("multipart without image field", "/stylize?style=mosaic",
     {"files": multipart(png(), field="picture")}, 400, "missing_image_field"),
    ("image field not a file", "/stylize?style=mosaic",
     {"data": {"image": "not a file"}, "files": {"other": ("x", b"x", "text/plain")}},
     400, "image_field_not_a_file"),
    ("broken multipart", "/stylize?style=mosaic",
     {"content": b"--nope\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
      "headers": {"content-type": "multipart/form-data; boundary=other"}},
     400, "malformed_multipart"),
    ("raw upload over byte limit", "/stylize?style=mosaic",
     {"content": b"\x89PNG" + b"\x00" * MAX_UPLOAD, "headers": {"content-type": "image/png"}},
     413, "upload_too_large"),
    ("multipart upload over byte limit", "/upscale?factor=4",
     {"files": multipart(b"\x89PNG" + b"\x00" * MAX_UPLOAD)}, 413, "upload_too_large"),
    ("style input over pixel limit", "/stylize?style=mosaic",
     {"files": multipart(png((65, 64)))}, 413, "image_too_large"),
    ("upscale output over side limit", "/upscale?factor=8",
     {"files": multipart(png((65, 10)))}, 413, "image_too_large"),
    ("decompression bomb", "/stylize?style=tiny_style",
     {"files": multipart(bomb_png(50_000))}, 413, "image_too_large"),
    ("unknown style", "/stylize?style=no_such_style", {"files": multipart(png())},
     404, "unknown_style"),
    ("missing style", "/stylize", {"files": multipart(png())}, 422, "missing_style"),
    ("style and mix", "/stylize?style=mosaic&mix=mosaic:1", {"files": multipart(png())},
     422, "conflicting_parameters"),
    ("strength above 1", "/stylize?style=mosaic&strength=1.5", {"files": multipart(png())},
     422, "invalid_request"),
    ("strength not a number", "/stylize?style=mosaic&strength=lots",
     {"files": multipart(png())}, 422, "invalid_request"),
    ("max_side too small", "/stylize?style=mosaic&max_side=4", {"files": multipart(png())},
     422, "invalid_request"),
    ("strength nan", "/stylize?style=mosaic&strength=nan", {"files": multipart(png())},
     422, "invalid_request"),
    ("style given twice", "/stylize?style=mosaic&style=tiny_style", {"files": multipart(png())},
     422, "repeated_parameter"),
    ("factor given twice", "/upscale?factor=4&factor=8", {"files": multipart(png())},
     422, "repeated_parameter"),
    ("keep_colors not a bool", "/stylize?style=mosaic&keep_colors=maybe",
     {"files": multipart(png())}, 422, "invalid_request"),
    ("mix with a negative weight", "/stylize?mix=mosaic:-1", {"files": multipart(png())},
     422, "invalid_style_mix"),
    ("mix weight not a number", "/stylize?mix=mosaic:abc", {"files": multipart(png())},
     422, "invalid_style_mix"),
    ("mix of two single-style nets", "/stylize?mix=mosaic:0.5,tiny_style:0.5",
     {"files": multipart(png())}, 422, "invalid_style_mix"),
    ("mix with an unknown style", "/stylize?mix=mosaic:0.5,no_such_style:0.5",
     {"files": multipart(png())}, 404, "unknown_style"),
    ("upscaler as style", "/stylize?style=x4", {"files": multipart(png())},
     422, "model_kind_mismatch"),
    ("empty style", "/stylize?style=", {"files": multipart(png())}, 422, "invalid_request"),
    ("factor 3", "/upscale?factor=3", {"files": multipart(png())}, 422, "invalid_factor"),
    ("factor 2", "/upscale?factor=2", {"files": multipart(png())}, 422, "invalid_factor"),
    ("factor not a number", "/upscale?factor=four", {"files": multipart(png())},
     422, "invalid_request"),
    ("factor 4.0", "/upscale?factor=4.0", {"files": multipart(png())}, 422, "invalid_request"),
    ("factor +4", "/upscale?factor=%2B4", {"files": multipart(png())}, 422, "invalid_request"),
    ("missing factor", "/upscale", {"files": multipart(png())}, 422, "invalid_request"),
    ("style model as upscaler", "/upscale?factor=4&model=mosaic", {"files": multipart(png())},
     422, "model_kind_mismatch"),
    ("x4 model asked for 8", "/upscale?factor=8&model=x4", {"files": multipart(png())},
     422, "model_factor_mismatch"),
    ("unknown upscaler", "/upscale?factor=4&model=nope", {"files": multipart(png())},
     404, "unknown_model"),
    ("unknown output format", "/stylize?style=mosaic&format=gif", {"files": multipart(png())},
     422, "invalid_request"),
    ("unknown mode", "/stylize?style=mosaic&mode=later", {"files": multipart(png())},
     422, "invalid_request"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [case[1:] for case in BAD_UPLOADS],
    ids=[case[0] for case in BAD_UPLOADS],
)
def test_bad_input_is_a_clear_4xx(
    api: Api, client: httpx.Client, path: str, kwargs: dict, status: int, code: str
) -> None:
    resp = client.post(path, **kwargs)
    body = assert_error(resp, status, code)
    if code == "unknown_style":
        assert body["styles"] == ["mosaic", "tiny_style"]
        assert "mosaic" in str(body["detail"])
    if code == "invalid_factor":
        assert body["factors"] == [4, 8]
    if code == "unknown_model":  # only what this factor could use instead (x8 cannot)
        assert body["models"] == ["x4"]
        assert "available: x4" in str(body["detail"])
    assert stream_length(api) == 0  # nothing was queued for a worker


@pytest.mark.parametrize(
    ("query", "parameter", "allowed"),
    [
        ("style=mosaic&strength=1.5", "strength", "0.0 <= strength <= 1.0"),
        ("style=mosaic&strength=-inf", "strength", "0.0 <= strength <= 1.0"),
        ("style=mosaic&strength=nan", "strength", "0.0 <= strength <= 1.0"),
        ("style=mosaic&max_side=4", "max_side", "16 <= max_side <= 8192"),
        ("style=mosaic&max_side=1e3", "max_side", "16 <= max_side <= 8192"),
        ("style=mosaic&format=gif", "format", None),  # a choice: its message lists them
    ],
)
def test_an_out_of_range_value_is_answered_with_the_allowed_range(
    client: httpx.Client, query: str, parameter: str, allowed: str | None
) -> None:
    body = assert_error(
        client.post(f"/stylize?{query}", files=multipart(png())), 422, "invalid_request"
    )
    (error,) = body["detail"]
    assert error["loc"] == ["query", parameter]
    assert error.get("allowed") == allowed
    if "nan" in query:  # not "should be less than or equal to 1", which nan is not
        assert "finite" in error["msg"]


def test_a_repeated_parameter_names_itself(api: Api, client: httpx.Client) -> None:
    resp = client.post("/stylize?style=mosaic&strength=0.5&style=mosaic", files=multipart(png()))
    body = assert_error(resp, 422, "repeated_parameter")
    assert body["parameters"] == ["style"] and "style" in body["detail"]
    assert stream_length(api) == 0


def test_a_parameter_the_endpoint_does_not_take_is_refused(api: Api, client: httpx.Client) -> None:
    """``max_side`` limits a stylisation; sent to /upscale it used to be ignored, and the
    caller waited for a full-size answer instead of hearing that the limit does not exist."""
    resp = client.post("/upscale?factor=4&max_side=128&colour=red", files=multipart(png()))
    body = assert_error(resp, 422, "unknown_parameter")
    assert body["parameters"] == ["colour", "max_side"]
    assert "factor" in body["allowed"] and "max_side" not in body["allowed"]
    assert "max_side" in body["detail"] and "factor" in body["detail"]
    assert stream_length(api) == 0
    # A GET that takes no parameters says so.
    assert client.get("/styles").status_code == 200
    body = assert_error(client.get("/styles?detail=1"), 422, "unknown_parameter")
    assert body["allowed"] == [] and "takes: none" in body["detail"]


def test_chunked_upload_over_the_limit_is_413(api: Api, client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(30):
            yield b"\xff" * 10_000

    resp = client.post(
        "/stylize?style=mosaic", content=chunks(), headers={"content-type": "image/jpeg"}
    )
    assert "content-length" not in resp.request.headers
    assert_error(resp, 413, "upload_too_large")
    assert stream_length(api) == 0


def test_unknown_routes_methods_and_jobs_are_json(client: httpx.Client) -> None:
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.get("/stylize?style=mosaic"), 405, "method_not_allowed")
    assert_error(client.get("/jobs/not-a-job-id"), 422, "invalid_request")
    assert_error(client.get("/jobs/" + "0" * 32), 404, "unknown_job")


# --- queue: what is enqueued, backpressure, timeout, async --------------------------------------


def test_async_submission_enqueues_the_decoded_pixels(api: Api, client: httpx.Client) -> None:
    data = png((20, 12), "RGBA", seed=5)
    resp = client.post("/upscale?factor=4&mode=async&format=webp", files=multipart(data))
    assert resp.status_code == 202, resp.text
    body = resp.json()
    job_id = body["job_id"]
    assert body["status"] == "queued"
    assert body["status_url"] == f"/jobs/{job_id}" == resp.headers["location"]

    entries = api.redis().xrange(api.keys.stream)
    assert len(entries) == 1
    job = Job.from_fields(entries[0][1])
    assert (job.job_id, job.op, job.model, job.output_format) == (job_id, "upscale", "x4", "webp")
    assert (job.width, job.height, job.channels) == (20, 12, 4)  # alpha travels with the job
    expected = np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(np.frombuffer(job.pixels, np.uint8).reshape(12, 20, 4), expected)
    assert job.deadline > time.time() + 60  # async deadline, not the 1 s sync timeout

    groups = api.redis().xinfo_groups(api.keys.stream)
    assert [g["name"] for g in groups] == [b"workers"]  # the API made the consumer group

    status = client.get(body["status_url"])
    assert status.status_code == 202
    assert status.json()["status"] == "queued"
    assert status.headers["retry-after"]


def test_raw_body_and_jpg_alias(api: Api, client: httpx.Client) -> None:
    resp = client.post(
        "/stylize?style=tiny_style&mode=async&format=jpg",
        content=jpeg((10, 8)),
        headers={"content-type": "image/jpeg"},
    )
    assert resp.status_code == 202, resp.text
    job = Job.from_fields(api.redis().xrange(api.keys.stream)[0][1])
    assert (job.model, job.op, job.output_format) == ("tiny_style", "stylize", "jpeg")
    assert (job.width, job.height, job.channels) == (10, 8, 3)


def test_backpressure_503_with_retry_after(api: Api, client: httpx.Client) -> None:
    for _ in range(2):  # MAX_QUEUE_DEPTH=2 and no worker: these stay queued
        assert (
            client.post("/stylize?style=mosaic&mode=async", files=multipart(png())).status_code
            == 202
        )
    for mode in ("async", "sync"):
        resp = client.post(f"/stylize?style=mosaic&mode={mode}", files=multipart(png()))
        body = assert_error(resp, 503, "queue_full")
        assert resp.headers["retry-after"] == str(RETRY_AFTER)
        assert body["queue_depth"] == 2
    assert stream_length(api) == 2
    metrics = client.get("/metrics").text
    assert (
        'imgsvc_jobs_total{mode="async",model="mosaic",op="stylize",outcome="rejected"} 1.0'
        in metrics
    )
    assert (
        'imgsvc_jobs_total{mode="sync",model="mosaic",op="stylize",outcome="rejected"} 1.0'
        in metrics
    )
    assert "imgsvc_queue_depth 2.0" in metrics


def test_timeout_is_504_and_cancels_the_job(api: Api, client: httpx.Client) -> None:
    started = time.monotonic()
    resp = client.post("/upscale?factor=8", files=multipart(png((8, 8))))
    elapsed = time.monotonic() - started
    body = assert_error(resp, 504, "timeout")
    assert elapsed >= 1.0  # REQUEST_TIMEOUT_S
    job_id = str(body["job_id"])
    r = api.redis()
    assert r.get(api.keys.cancel(job_id)) == b"1"
    assert 0 < r.ttl(api.keys.cancel(job_id)) <= 600
    assert r.get(api.keys.status(job_id)) is None
    job = Job.from_fields(r.xrange(api.keys.stream)[0][1])
    assert job.job_id == job_id and job.deadline <= time.time()  # a worker would skip it too


# --- Redis loss and recovery ---------------------------------------------------------------------


def test_redis_down_is_503_and_recovers_by_itself(
    api: Api, client: httpx.Client, redis_instance: object
) -> None:
    assert (
        client.post("/stylize?style=mosaic&mode=async", files=multipart(png())).status_code == 202
    )
    redis_instance.stop()  # type: ignore[attr-defined]
    try:
        for mode in ("sync", "async"):
            resp = client.post(f"/stylize?style=mosaic&mode={mode}", files=multipart(png()))
            assert_error(resp, 503, "queue_unavailable")
            assert resp.headers["retry-after"] == str(RETRY_AFTER)
        assert_error(client.get("/jobs/" + "1" * 32), 503, "queue_unavailable")
        body = assert_error(client.get("/readyz"), 503, "not_ready")
        assert body["redis"] is False
        assert client.get("/healthz").status_code == 200
        assert "imgsvc_redis_up 0.0" in client.get("/metrics").text
        # bad input is still judged without Redis
        assert_error(
            client.post("/upscale?factor=3", files=multipart(png())), 422, "invalid_factor"
        )
    finally:
        redis_instance.start()  # type: ignore[attr-defined]
    # No restart of the API: its connection pool reconnects on its own.
    resp = client.post("/stylize?style=mosaic&mode=async", files=multipart(png()))
    assert resp.status_code == 202, resp.text
    assert stream_length(api) == 1  # Redis came back empty (no persistence): only the new job
    body = assert_error(client.get("/readyz"), 503, "not_ready")
    assert body["redis"] is True
    assert "imgsvc_redis_up 1.0" in client.get("/metrics").text


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_count_requests_by_route_template(client: httpx.Client) -> None:
    client.get("/jobs/" + "2" * 32)
    client.post("/stylize?style=nope", files=multipart(png()))
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert 'imgsvc_http_requests_total{method="GET",route="/jobs/{job_id}",status="404"}' in text
    assert 'imgsvc_http_requests_total{method="POST",route="/stylize",status="404"}' in text
    assert "2" * 32 not in text  # job ids never become label values
    for name in (
        "imgsvc_http_request_duration_seconds_bucket",
        "imgsvc_image_latency_seconds",
        "imgsvc_queue_wait_seconds",
        "imgsvc_compute_seconds",
        "imgsvc_encode_seconds",
        "imgsvc_batch_size",
        "imgsvc_decode_seconds_bucket",
        "imgsvc_live_workers 0.0",
    ):
        assert name in text, name

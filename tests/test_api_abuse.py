"""The API under abuse, over real HTTP and a real Redis, without a worker (issue 15).

Each test reproduces a measured defect and checks the behaviour that replaced it: a burst of
large uploads at a full queue costs no memory; slow, trickling and silent connections are closed
by the default timeouts; an aborted upload is a client abort (499), not a 500 with tracebacks;
protocol errors are JSON; keys, scopes and the per-key token bucket; request ids in responses,
job records and JSON log lines; a complete OpenAPI; docs that load nothing from a CDN.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from jobqueue.protocol import Job, JobResult, JobStatus, Keys
from service.keys import digest
from service.launch import Child, free_port, start_api, wait_http

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ALICE, BOB, OPS = "alice-key-0123456789", "bob-key-0123456789", "ops-key-0123456789"


@dataclass
class Api:
    url: str
    port: int
    child: Child
    log: Path
    keys: Keys
    redis_url: str

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"unparsed": line})
        return records


def start(redis_url: str, zoo: Path, logdir: Path, prefix: str, **env: str) -> Iterator[Api]:
    port = free_port()
    log = logdir / f"{prefix}.log"
    settings = {
        **os.environ,
        "REDIS_URL": redis_url,
        "QUEUE_PREFIX": prefix,
        "MODEL_ZOO_DIR": str(zoo),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    with open(log, "wb") as out:
        child = start_api(settings, output=out, cwd=str(REPO))
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", 60, child)
            yield Api(f"http://127.0.0.1:{port}", port, child, log, Keys(prefix), redis_url)
        finally:
            child.stop()


@pytest.fixture(scope="module")
def api(
    redis_instance: Any, tiny_zoo_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """The default limits (4096² style input, 15 s header and body timeouts), a queue of one."""
    yield from start(
        redis_instance.url,
        tiny_zoo_template,
        tmp_path_factory.mktemp("abuse"),
        "abuse",
        MAX_QUEUE_DEPTH="1",
        RETRY_AFTER_S="3",
    )


@pytest.fixture(scope="module")
def guarded(
    redis_instance: Any, tiny_zoo_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """Auth on: alice and bob (jobs) in a file of hashed keys, ops (admin) from API_KEYS;
    metrics for admins only, docs for any key, two submissions per burst."""
    folder = tmp_path_factory.mktemp("keys")
    keyfile = folder / "api_keys"
    keyfile.write_text(
        f"# name sha256:hex scopes\nalice sha256:{digest(ALICE)}\nbob sha256:{digest(BOB)} jobs\n"
    )
    yield from start(
        redis_instance.url,
        tiny_zoo_template,
        folder,
        "guarded",
        AUTH_REQUIRED="true",
        API_KEYS_FILE=str(keyfile),
        API_KEYS=f"ops:{OPS}:admin",
        METRICS_ACCESS="admin",
        DOCS_ACCESS="key",
        RATE_LIMIT_PER_MINUTE="6",
        RATE_LIMIT_BURST="2",
        MAX_QUEUE_DEPTH="100",
    )


@pytest.fixture()
def clean(api: Api, redis_server: str) -> Api:
    """``api`` with Redis emptied (``redis_server`` flushes it)."""
    return api


def png(size: tuple[int, int] = (16, 16), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    if mode == "L":
        Image.new("L", size, 128).save(buf, "PNG")
    else:
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            buf, "PNG"
        )
    return buf.getvalue()


def files(data: bytes) -> dict[str, tuple[str, bytes, str]]:
    return {"image": ("in.png", data, "image/png")}


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# --- defect 2: admission before decoding ---------------------------------------------------------


def test_large_uploads_at_a_full_queue_cost_no_memory(clean: Api) -> None:
    """Before: each 4000² upload was decoded (~110 MB) before the queue-full check; eight at
    once took the API from 63 MB to 871 MB. Now the queue is checked before decoding."""
    with clean.client() as http:
        filler = http.post("/stylize?style=mosaic&mode=async", files=files(png()))
        assert filler.status_code == 202, filler.text  # MAX_QUEUE_DEPTH=1: now full
    big = png((4000, 4000), "L")
    assert len(big) < 100_000  # a small upload of a large image (about 15 kB)

    def send(_: int) -> httpx.Response:
        with clean.client() as http:
            # async: within its compute budget, so only the full queue refuses it
            return http.post("/stylize?style=mosaic&mode=async", content=big,
                             headers={"content-type": "image/png"})  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    for resp in answers:
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"] == "queue_full" and resp.headers["retry-after"] == "3"
    assert peak_rss_mb(clean.child.process.pid) < 200
    assert clean.redis().xlen(clean.keys.stream) == 1


# --- defect 3: slow clients ----------------------------------------------------------------------


def _slow_client(port: int, kind: str, results: dict[str, list[tuple[float, bytes]]]) -> None:
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    received = b""
    try:
        sock.settimeout(1.0)
        if kind == "header":
            sock.sendall(b"POST /stylize?style=mosaic HTTP/1.1\r\nHost: x\r\n")
        elif kind == "body":
            sock.sendall(
                b"POST /stylize?style=mosaic HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            )
        for n in range(40):  # at most 40 s; the server must close long before
            try:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
            except TimeoutError:
                pass
            except OSError:
                break
            try:
                if kind == "header":
                    sock.sendall(f"X-Pad-{n}: y\r\n".encode())
                elif kind == "body":
                    sock.sendall(b"\x00" * 10)  # 10 bytes a second
            except OSError:
                break
    finally:
        sock.close()
    results[kind].append((time.monotonic() - started, received))


def test_slow_silent_and_trickling_connections_are_closed_by_default(clean: Api) -> None:
    """Before: 10 slow-header, 10 slow-body (10 B/s) and one silent connection were all still
    open after 45 s. Now the default 15 s header and body timeouts close each of them (408
    JSON), and the API keeps answering everyone else meanwhile."""
    results: dict[str, list[tuple[float, bytes]]] = {"header": [], "body": [], "silent": []}
    threads = [
        threading.Thread(target=_slow_client, args=(clean.port, kind, results))
        for kind in ["header"] * 10 + ["body"] * 10 + ["silent"]
    ]
    for thread in threads:
        thread.start()
    time.sleep(2)
    with clean.client() as http:
        started = time.monotonic()
        assert http.get("/healthz").status_code == 200
        assert time.monotonic() - started < 2
    for thread in threads:
        thread.join(60)
    assert [len(results[k]) for k in ("header", "body", "silent")] == [10, 10, 1]
    for kind, outcomes in results.items():
        for elapsed, received in outcomes:
            assert 14 <= elapsed <= 19, (kind, elapsed)  # the 15 s default closed it
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), (kind, received[:200])
            assert json.loads(body)["error"] == "request_timeout"
    with clean.client() as http:
        text = http.get("/metrics").text
    assert metric(text, "imgsvc_http_requests_total", route="/stylize", status="408") == 10
    assert metric(text, "imgsvc_http_requests_total", status="500") == 0


# --- defect 4: aborted uploads -------------------------------------------------------------------


def test_an_aborted_upload_is_a_client_abort_not_a_500(clean: Api) -> None:
    """Before: counted as a 500 in /metrics, with two ClientDisconnect tracebacks in the log."""
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", clean.port), timeout=5) as sock:
            sock.sendall(
                b"POST /upscale?factor=4 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 50000\r\n\r\n" + b"\x89PNG" + b"\x00" * 996
            )
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    with clean.client() as http:
        while time.monotonic() < deadline:
            text = http.get("/metrics").text
            if metric(text, "imgsvc_http_requests_total", route="/upscale", status="499") >= 2:
                break
            time.sleep(0.1)
    assert metric(text, "imgsvc_http_requests_total", route="/upscale", status="499") == 2
    assert metric(text, "imgsvc_http_requests_total", status="500") == 0
    log = clean.log.read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log
    aborts = [
        r for r in clean.log_records() if "client closed the connection" in r.get("message", "")
    ]
    assert len(aborts) == 2 and all(r["request_id"] for r in aborts)


# --- defect 5: protocol errors, 503 job_failed ----------------------------------------------


def test_protocol_errors_are_json(clean: Api) -> None:
    with socket.create_connection(("127.0.0.1", clean.port), timeout=5) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower()
    assert json.loads(body)["error"] == "bad_http_request"


def test_a_503_job_failed_carries_retry_after(clean: Api) -> None:
    """A job the workers gave up on (dead-lettered after its deliveries) is a 503: with the
    Retry-After every other 503 has."""
    with clean.client() as http:
        accepted = http.post("/upscale?factor=4&mode=async", files=files(png()))
        job_id = accepted.json()["job_id"]
        result = JobResult(job_id, False, error="its worker died 3 times", status_code=503,
                           code="job_abandoned", finished_at=time.time())  # fmt: skip
        clean.redis().set(clean.keys.result(job_id), result.encode())
        resp = http.get(f"/jobs/{job_id}")
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "3"
    body = resp.json()
    assert (body["error"], body["reason"]) == ("job_failed", "job_abandoned")
    assert body["job_id"] == job_id


# --- defect 7: request ids, logs, OpenAPI, docs ----------------------------------------------


def test_request_ids_reach_the_response_the_job_and_the_logs(clean: Api) -> None:
    with clean.client() as http:
        given = http.post("/upscale?factor=4&mode=async", files=files(png()),
                          headers={"X-Request-ID": "client-abc.123"})  # fmt: skip
        assert given.headers["x-request-id"] == "client-abc.123"
        job_id = given.json()["job_id"]
        traced = http.get(
            "/healthz",
            headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        )
        assert traced.headers["x-request-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        for bad_id in ("has spaces, commas", "x" * 300):
            bad = http.get("/healthz", headers={"X-Request-ID": bad_id})
            assert len(bad.headers["x-request-id"]) == 32  # replaced by a generated one
    (entry,) = clean.redis().xrange(clean.keys.stream)
    assert Job.from_fields(entry[1]).request_id == "client-abc.123"
    status = JobStatus.decode(clean.redis().get(clean.keys.status(job_id)))
    assert status.request_id == "client-abc.123"
    access = [r for r in clean.log_records() if r.get("request_id") == "client-abc.123"]
    assert access, clean.log.read_text()[-2000:]
    line = access[-1]
    assert line["logger"] == "service.access" and line["status"] == 202
    assert line["job_id"] == job_id and line["model"] == "x4" and line["duration_ms"] > 0
    assert all("unparsed" not in r for r in clean.log_records())  # every line is JSON


def test_openapi_documents_every_answer(clean: Api) -> None:
    with clean.client() as http:
        spec = http.get("/openapi.json").json()
    stylize = spec["paths"]["/stylize"]["post"]["responses"]
    for code in ("200", "202", "400", "401", "408", "413", "415", "422", "429", "503", "504"):
        assert code in stylize, code
    assert stylize["202"]["content"]["application/json"]["schema"]["$ref"].endswith("JobAccepted")
    assert stylize["503"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")
    assert "Retry-After" in stylize["503"]["headers"]
    assert "Retry-After" in stylize["429"]["headers"]
    assert "queue_full" in stylize["503"]["content"]["application/json"]["examples"]
    assert "X-Request-ID" in stylize["200"]["headers"]
    jobs = spec["paths"]["/jobs/{job_id}"]
    assert {"get", "delete"} <= set(jobs)
    assert jobs["get"]["responses"]["202"]["content"]["application/json"]["schema"]["$ref"]
    assert "410" in jobs["get"]["responses"]
    schemes = spec["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}


def test_docs_load_nothing_from_elsewhere(clean: Api) -> None:
    with clean.client() as http:
        for page in ("/docs", "/redoc"):
            html = http.get(page).text
            assert "/docs/assets/" in html
            for url in ("cdn.", "jsdelivr", "unpkg", "fonts.googleapis", "fastapi.tiangolo"):
                assert url not in html, (page, url)
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
            resp = http.get(f"/docs/assets/{asset}")
            assert resp.status_code == 200 and len(resp.content) > 100_000, asset


# --- defect 6: keys, scopes, quotas, public /styles ------------------------------------------


def test_job_routes_need_a_key_and_the_rest_stays_public(guarded: Api, redis_server: str) -> None:
    with guarded.client() as http:
        missing = http.post("/stylize?style=mosaic&mode=async", files=files(png()))
        assert missing.status_code == 401 and missing.json()["error"] == "missing_api_key"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = http.post("/stylize?style=mosaic&mode=async", files=files(png()),
                          headers={"Authorization": "Bearer not-a-key"})  # fmt: skip
        assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_api_key"
        assert http.get("/jobs/" + "0" * 32).status_code == 401
        for public in ("/", "/styles", "/healthz", "/static/app.js"):
            assert http.get(public).status_code == 200, public
        # metrics: admins only; docs: any key
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"X-API-Key": ALICE}).status_code == 403
        assert http.get("/metrics", headers={"X-API-Key": OPS}).status_code == 200
        assert http.get("/openapi.json").status_code == 401
        assert http.get("/docs/assets/swagger-ui.css").status_code == 401
        assert http.get("/docs", headers={"Authorization": f"Bearer {BOB}"}).status_code == 200


def test_a_job_belongs_to_its_key(guarded: Api, redis_server: str) -> None:
    alice = {"Authorization": f"Bearer {ALICE}"}
    with guarded.client() as http:
        resp = http.post("/upscale?factor=4&mode=async", files=files(png()), headers=alice)
        assert resp.status_code == 202, resp.text
        url = resp.json()["status_url"]
        (entry,) = guarded.redis().xrange(guarded.keys.stream)
        assert Job.from_fields(entry[1]).owner == "alice"  # the key's name, never the key
        assert ALICE.encode() not in entry[1][b"owner"]
        assert http.get(url, headers=alice).status_code == 202
        other = http.get(url, headers={"X-API-Key": BOB})
        assert other.status_code == 404 and other.json()["error"] == "unknown_job"
        assert http.delete(url, headers={"X-API-Key": BOB}).status_code == 404
        assert http.get(url, headers={"X-API-Key": OPS}).status_code == 202  # admins see all
        cancelled = http.delete(url, headers=alice)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        gone = http.get(url, headers=alice)
        assert gone.status_code == 410 and gone.json()["error"] == "job_cancelled"
    job_id = url.rsplit("/", 1)[1]
    assert guarded.redis().exists(guarded.keys.cancel(job_id))  # workers will skip or stop it


def test_submissions_are_rate_limited_per_key(guarded: Api, redis_server: str) -> None:
    """A token bucket per key in Redis (6 a minute, bursts of 2): the third quick submission
    is 429 with Retry-After, and another key still has its own burst."""
    bob = {"X-API-Key": BOB}
    with guarded.client() as http:
        for _ in range(2):
            ok = http.post("/upscale?factor=4&mode=async", files=files(png()), headers=bob)
            assert ok.status_code == 202, ok.text
        limited = http.post("/upscale?factor=4&mode=async", files=files(png()), headers=bob)
        assert limited.status_code == 429
        assert limited.json()["error"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 10  # one token every 10 s
        alice = http.post("/upscale?factor=4&mode=async", files=files(png()),
                          headers={"X-API-Key": ALICE})  # fmt: skip
        assert alice.status_code == 202
    assert guarded.redis().xlen(guarded.keys.stream) == 3  # the refused one was never queued


def test_styles_has_no_host_paths_or_hardware(clean: Api) -> None:
    """The public catalog of the shipped zoo (whose manifest records the training data's
    folder, the style images' paths and the trainer's hardware)."""
    from service.catalog import ModelCatalog

    shipped = json.loads((REPO / "model_zoo/manifest.json").read_text())
    raw = json.dumps(shipped)
    assert "/work/" in raw and '"hardware"' in raw  # what there is to hide
    public = json.dumps(ModelCatalog().describe())
    for secret in ('"hardware"', '"style_image"', '"data"', '"root"', '"/', "/work/", "/home/"):
        assert secret not in public, secret
    described = ModelCatalog().describe()
    assert {s["name"] for s in described["styles"]} >= {"mosaic", "candy"}
    assert all(m["sha256"] and m["metrics"] for m in described["upscalers"])
    with clean.client() as http:  # and over HTTP (tiny zoo), same shape
        assert '"hardware"' not in http.get("/styles").text

"""The Python client and its command line against the real service (uvicorn API + worker
subprocesses, a real redis-server, the tiny zoo), plus its request building as pure functions.

Two stacks share the session's Redis under their own prefixes: a working one (API + worker) and
an idle one (API only, ``MAX_QUEUE_DEPTH=1``, 1 s timeouts) whose queue the tests fill or drain
to provoke backpressure, timeouts and recovery. Nothing is mocked: each retry the client makes
is a real request the API counts in its metrics.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from imgsvc_client import (
    AsyncClient,
    Client,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    JobTimeout,
    QueueFull,
    RetryPolicy,
    ServiceError,
    ServiceUnavailable,
    ServiceUnreachable,
    UnknownJob,
    UnknownModel,
    UnknownStyle,
    UnsupportedImage,
)
from imgsvc_client._core import mix_param, parse_server_timing, stylize_params, upscale_params
from imgsvc_client.cli import main as cli
from imgsvc_client.cli import plan
from imgsvc_client.errors import parse_retry_after
from service.launch import free_port
from tests.test_e2e_serving import Stack, image_array, png_bytes, reference

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RETRY_AFTER_S = 1
FAST = RetryPolicy(max_retries=0)  # see each error once, as the service gave it


@pytest.fixture(scope="module")
def stack(
    redis_instance: Any, tiny_zoo_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    service = Stack(
        redis_instance.url,
        tiny_zoo_template,
        "client",
        tmp_path_factory.mktemp("client-logs"),
        {"MAX_STYLE_PIXELS": str(96 * 96), "MAX_UPLOAD_BYTES": "200000"},
    )
    with service.running() as running:
        yield running


@pytest.fixture(scope="module")
def idle_stack(
    redis_instance: Any, tiny_zoo_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """An API without workers: its queue holds one job, then answers 503 queue_full."""
    service = Stack(
        redis_instance.url,
        tiny_zoo_template,
        "client_idle",
        tmp_path_factory.mktemp("client-idle-logs"),
        {
            "MAX_QUEUE_DEPTH": "1",
            "RETRY_AFTER_S": str(RETRY_AFTER_S),
            "REQUEST_TIMEOUT_S": "1",
            "WAIT_CHUNK_S": "0.25",
            "REDIS_TIMEOUT_S": "2",
        },
    )
    with service.running(workers=0) as running:
        yield running


@pytest.fixture()
def url(stack: Stack, redis_instance: Any) -> Iterator[str]:
    """The working stack's URL, ready (Redis is not flushed: the worker's group lives there)."""
    if redis_instance.process is None:
        redis_instance.start()
    stack.wait_ready()
    yield stack.url
    dead = [c.name for c in stack.children if not c.alive]
    assert not dead, f"{dead} died\n{stack.logs()}"


@pytest.fixture()
def idle(idle_stack: Stack, redis_instance: Any) -> Iterator[Stack]:
    """The idle API with an empty queue."""
    if redis_instance.process is None:
        redis_instance.start()
    r = redis.Redis.from_url(idle_stack.redis_url)
    r.delete(idle_stack.keys.stream)
    yield idle_stack
    r.delete(idle_stack.keys.stream)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= 1


def rejected_count(base_url: str) -> float:
    text = httpx.get(base_url + "/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "imgsvc_jobs_total"
        and sample.labels["op"] == "stylize"
        and sample.labels["outcome"] == "rejected"
    )


def fill_queue(stack: Stack) -> None:
    with Client(stack.url, retry=FAST) as client:
        client.submit_stylize(png_bytes(image_array(8, 8)), "mosaic")


# --- requests as pure functions ------------------------------------------------------------------


def test_controls_are_sent_only_when_set() -> None:
    assert stylize_params("mosaic") == {"style": "mosaic"}
    assert stylize_params(
        "mosaic", strength=0.5, keep_colors=False, max_side=512, output_format="webp", mode="async"
    ) == {
        "style": "mosaic",
        "strength": "0.5",
        "keep_colors": "false",
        "max_side": "512",
        "format": "webp",
        "mode": "async",
    }
    # mix replaces style; weights keep their order
    assert stylize_params(None, mix={"mosaic": 0.7, "candy": 0.3}) == {
        "mix": "mosaic:0.7,candy:0.3"
    }
    assert mix_param([("a", 1), ("b", 0.25)]) == "a:1,b:0.25"
    assert mix_param("a:0.5,b:0.5") == "a:0.5,b:0.5"
    for bad in ({}, {"style": "a", "mix": "a:1,b:0"}):
        with pytest.raises(ValueError, match="exactly one"):
            stylize_params(bad.get("style"), mix=bad.get("mix"))
    with pytest.raises(ValueError, match="strength"):
        stylize_params("mosaic", strength=1.5)
    assert upscale_params(8) == {"factor": "8"}
    assert upscale_params(4, model="x4_pixel", mode="async") == {
        "factor": "4",
        "model": "x4_pixel",
        "mode": "async",
    }


def test_retry_timing_honours_retry_after_with_a_cap() -> None:
    policy = RetryPolicy(max_retries=3, max_delay_s=5, backoff_s=0.5)
    assert policy.delay(0, 2.0) == 2.0
    assert policy.delay(0, 3600.0) == 5  # a proxy's "come back in an hour" is capped
    assert [policy.delay(n, None) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_server_timing("decode;dur=1.5, compute;dur=40.0, bad") == {
        "decode": 1.5,
        "compute": 40.0,
    }


# --- the working service -----------------------------------------------------------------------


def test_styles(url: str) -> None:
    with Client(url) as client:
        catalog = client.styles()
    assert catalog.style_names == ["mosaic", "tiny_style"]
    assert catalog.upscaler_names() == ["x4", "x8"] and catalog.upscaler_names(8) == ["x8"]
    assert catalog.styles[0].raw["sha256"] and catalog.upscalers[1].factor == 8


def test_stylize_and_upscale(stack: Stack, url: str, tmp_path: Path) -> None:
    source = image_array(40, 24, seed=1)
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(source))
    with Client(url) as client, open(path, "rb") as handle:
        for image in (path, str(path), png_bytes(source), handle):  # every kind of input
            result = client.stylize(image, "tiny_style")
            assert_close(decoded(result.content), reference(stack.zoo, "tiny_style", source))
        assert result.content_type == "image/png" and result.extension == "png"
        assert result.job_id and len(result.job_id) == 32
        assert result.batch_size and result.batch_size >= 1
        assert {"queue", "compute", "encode"} <= set(result.timings_ms)
        assert result.save(tmp_path / "out.png").read_bytes() == result.content

        big = client.upscale(png_bytes(image_array(10, 8, seed=2)), 8)
        assert decoded(big.content).shape == (64, 80, 3)
        jpeg = client.upscale(path, 4, model="x4", output_format="jpeg")
        assert jpeg.content_type == "image/jpeg" and jpeg.extension == "jpg"
        assert Image.open(io.BytesIO(jpeg.content)).size == (160, 96)


def test_style_controls_reach_the_service_only_when_set(url: str) -> None:
    sent: list[httpx.URL] = []
    hooks = {"request": [lambda request: sent.append(request.url)]}
    image = png_bytes(image_array(24, 16, seed=3))
    with Client(url, event_hooks=hooks) as client:
        client.stylize(image, "mosaic")
        # today's API ignores controls it does not know; one that knows them applies them
        result = client.stylize(image, "mosaic", strength=0.5, keep_colors=True, max_side=64)
    assert dict(sent[0].params) == {"style": "mosaic"}
    assert dict(sent[1].params) == {
        "style": "mosaic",
        "strength": "0.5",
        "keep_colors": "true",
        "max_side": "64",
    }
    assert decoded(result.content).shape == (16, 24, 3)


def test_async_jobs(stack: Stack, url: str) -> None:
    source = image_array(12, 10, seed=4)
    statuses: list[str] = []
    with Client(url) as client:
        job = client.submit_upscale(png_bytes(source), 4)
        assert len(job.job_id) == 32 and job.status_url == f"/jobs/{job.job_id}"
        assert job.status == "queued"
        result = client.wait(job, on_status=statuses.append)
        assert_close(decoded(result.content), reference(stack.zoo, "x4", source))
        assert set(statuses) <= {"queued", "running"}
        again = client.wait(job.job_id)  # a bare id works; results stay until their TTL
        assert again.content == result.content
        with pytest.raises(UnknownJob):
            client.wait("0" * 32)

    async def many() -> list[bytes]:
        async with AsyncClient(url) as client:
            jobs = [
                await client.submit_stylize(png_bytes(image_array(16, 12, seed=s)), "mosaic")
                for s in range(3)
            ]
            results = await asyncio.gather(*(client.wait(j) for j in jobs))
            direct = await client.stylize(png_bytes(image_array(16, 12, seed=0)), "mosaic")
        return [r.content for r in [*results, direct]]

    contents = asyncio.run(many())
    for seed, content in enumerate(contents[:3]):
        expected = reference(stack.zoo, "mosaic", image_array(16, 12, seed=seed))
        assert_close(decoded(content), expected)
    assert_close(decoded(contents[3]), decoded(contents[0]))


TRUNCATED = png_bytes(image_array(48, 48))[:900]
ERRORS = [
    # (call, error class, code)
    (lambda c: c.stylize(png_bytes(image_array(8, 8)), "nope"), UnknownStyle, "unknown_style"),
    (lambda c: c.upscale(png_bytes(image_array(8, 8)), 4, model="nope"), UnknownModel,
     "unknown_model"),
    (lambda c: c.upscale(png_bytes(image_array(8, 8)), 3), InvalidRequest, "invalid_factor"),
    (lambda c: c.stylize(b"plain text, no pixels", "mosaic"), UnsupportedImage,
     "unsupported_image"),
    (lambda c: c.stylize(TRUNCATED, "mosaic"), InvalidImage, "corrupt_image"),
    (lambda c: c.stylize(png_bytes(image_array(97, 96)), "mosaic"), ImageTooLarge,
     "image_too_large"),
    (lambda c: c.stylize(b"\x89PNG" + bytes(200_000), "mosaic"), ImageTooLarge,
     "upload_too_large"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "cls", "code"), ERRORS, ids=[e[2] for e in ERRORS])
def test_errors_are_typed(url: str, call: Any, cls: type[ServiceError], code: str) -> None:
    with Client(url) as client, pytest.raises(cls) as caught:
        call(client)
    error = caught.value
    assert error.code == code and error.attempts == 1  # client errors are never retried
    assert str(error).endswith(f"({code}, HTTP {error.status_code})")
    if cls is UnknownStyle:
        assert error.available == ["mosaic", "tiny_style"]  # type: ignore[attr-defined]


# --- busy, slow and unreachable services -------------------------------------------------------


def test_queue_full_is_retried_after_retry_after_then_raised(idle: Stack) -> None:
    fill_queue(idle)
    before = rejected_count(idle.url)
    started = time.monotonic()
    with (
        Client(idle.url, retry=RetryPolicy(max_retries=2)) as client,
        pytest.raises(QueueFull) as c,
    ):
        client.submit_stylize(png_bytes(image_array(8, 8)), "mosaic")
    elapsed = time.monotonic() - started
    assert c.value.retry_after == RETRY_AFTER_S and c.value.attempts == 3
    assert isinstance(c.value, ServiceUnavailable)
    assert 2 * RETRY_AFTER_S <= elapsed < 2 * RETRY_AFTER_S + 5  # two waits of Retry-After
    assert rejected_count(idle.url) == before + 3  # the service saw all three attempts


def test_retry_after_is_capped(idle: Stack) -> None:
    fill_queue(idle)
    started = time.monotonic()
    policy = RetryPolicy(max_retries=3, max_delay_s=0.1)
    with Client(idle.url, retry=policy) as client, pytest.raises(QueueFull) as caught:
        client.submit_stylize(png_bytes(image_array(8, 8)), "mosaic")
    assert caught.value.attempts == 4
    assert time.monotonic() - started < RETRY_AFTER_S  # three capped waits, not three seconds


def test_a_retry_succeeds_once_the_queue_drains(idle: Stack) -> None:
    fill_queue(idle)
    r = redis.Redis.from_url(idle.redis_url)

    def drain() -> None:  # what a worker does with a finished job: XACK + XDEL
        time.sleep(RETRY_AFTER_S * 1.5)
        for entry_id, _ in r.xrange(idle.keys.stream):
            r.xdel(idle.keys.stream, entry_id)

    drainer = threading.Thread(target=drain)
    drainer.start()
    started = time.monotonic()
    try:
        with Client(idle.url, retry=RetryPolicy(max_retries=5)) as client:
            job = client.submit_stylize(png_bytes(image_array(8, 8)), "tiny_style")
    finally:
        drainer.join()
    assert time.monotonic() - started >= RETRY_AFTER_S
    assert [f[b"job_id"].decode() for _, f in r.xrange(idle.keys.stream)] == [job.job_id]


def test_timeouts(idle: Stack) -> None:
    with Client(idle.url, retry=FAST) as client:
        with pytest.raises(JobTimeout) as server_side:  # REQUEST_TIMEOUT_S=1, no worker
            client.stylize(png_bytes(image_array(8, 8)), "mosaic")
        assert server_side.value.status_code == 504 and server_side.value.code == "timeout"
        assert server_side.value.job_id and len(server_side.value.job_id) == 32
        # the cancelled job stays in the stream until a worker skips it; make room
        redis.Redis.from_url(idle.redis_url).delete(idle.keys.stream)

        job = client.submit_upscale(png_bytes(image_array(8, 8)), 4)
        started = time.monotonic()
        with pytest.raises(JobTimeout) as client_side:
            client.wait(job, timeout=0.5)
        assert time.monotonic() - started < 2
        assert client_side.value.status_code is None and client_side.value.job_id == job.job_id


def test_redis_down_is_service_unavailable(idle: Stack, redis_instance: Any) -> None:
    redis_instance.stop()
    try:
        policy = RetryPolicy(max_retries=1)
        with Client(idle.url, retry=policy) as client, pytest.raises(ServiceUnavailable) as caught:
            client.stylize(png_bytes(image_array(8, 8)), "mosaic")
    finally:
        redis_instance.start()
    assert caught.value.code == "queue_unavailable" and caught.value.attempts == 2


def test_unreachable_service() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    client = Client(dead, retry=RetryPolicy(backoff_s=0.05))
    with client, pytest.raises(ServiceUnreachable, match="no answer from"):
        client.styles()
    assert time.monotonic() - started < 5


# --- the command line ------------------------------------------------------------------------


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(array))
    return path


def test_cli_stylizes_a_folder_beside_its_files(
    stack: Stack, url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = {name: image_array(20 + i, 14, seed=10 + i) for i, name in enumerate("abc")}
    for name, array in sources.items():
        write_png(tmp_path / f"{name}.png", array)
    (tmp_path / "notes.txt").write_text("not an image: not taken from a folder")
    write_png(tmp_path / "old.tiny_style.png", image_array(8, 8))  # an earlier output

    args = ["stylize", str(tmp_path), "--style", "tiny_style", "--concurrency", "3", "--url", url]
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert "3/3" in err and "3 written, 0 failed" in err
    for name, array in sources.items():
        out = decoded((tmp_path / f"{name}.tiny_style.png").read_bytes())
        assert_close(out, reference(stack.zoo, "tiny_style", array))
    assert not (tmp_path / "old.tiny_style.tiny_style.png").exists()

    stamp = (tmp_path / "a.tiny_style.png").stat().st_mtime_ns
    assert cli([*args, "-q"]) == 0
    assert "0 written, 0 failed, 3 skipped" in capsys.readouterr().err
    assert (tmp_path / "a.tiny_style.png").stat().st_mtime_ns == stamp


def test_cli_upscales_a_tree_into_a_folder(url: str, tmp_path: Path) -> None:
    write_png(tmp_path / "in" / "a.png", image_array(10, 6, seed=1))
    write_png(tmp_path / "in" / "sub" / "b.png", image_array(6, 10, seed=2))
    out = tmp_path / "out"
    args = ["upscale", str(tmp_path / "in"), "--out", str(out), "--recursive", "-q", "--url", url]
    assert cli([*args, "--factor", "8", "--format", "jpeg"]) == 0
    with Image.open(out / "a.x8.jpg") as a, Image.open(out / "sub" / "b.x8.jpg") as b:
        assert (a.format, a.size, b.size) == ("JPEG", (80, 48), (48, 80))
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.x8.jpg", "b.x8.jpg"]


def test_cli_names_bad_files_and_does_the_rest(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_png(tmp_path / "good.png", image_array(12, 12))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert cli(["stylize", str(good), str(notes), "--style", "mosaic", "--url", url]) == 1
    err = capsys.readouterr().err
    assert f"error: {notes}:" in err and "unsupported_image, HTTP 415" in err
    assert "1 written, 1 failed" in err
    assert (tmp_path / "good.mosaic.png").is_file() and not (tmp_path / "notes.mosaic.png").exists()


def test_cli_refuses_before_sending_anything(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = write_png(tmp_path / "a" / "x.png", image_array(8, 8))
    twin = write_png(tmp_path / "b" / "x.png", image_array(8, 8))
    cases = [
        (["stylize", str(photo), "--style", "nope"], "unknown style nope; available: mosaic"),
        (["upscale", str(photo), "--factor", "8", "--model", "x4"], "no x8 model 'x4'"),
        (["stylize", str(tmp_path / "missing.png"), "--style", "mosaic"], "no such file"),
        (["stylize", str(photo), str(twin), "--style", "mosaic", "--out", str(tmp_path)],
         "would both be written to"),
    ]  # fmt: skip
    for args, message in cases:
        assert cli([*args, "--url", url]) == 2, args
        assert message in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    assert cli(["styles", "--url", dead]) == 2
    assert "no answer from" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        cli(["stylize", str(photo), "--mix", "mosaic=0.5", "--url", url])
    assert usage.value.code == 2
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["x.png", "x.png"]


def test_cli_output_names() -> None:
    here = REPO / "service" / "static"
    tasks = plan([here / "sample.jpg"], "mosaic+candy", "webp", None, recursive=False)
    assert [t.target for t in tasks] == [here / "sample.mosaic+candy.webp"]


def test_cli_module_and_console_script(url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "imgsvc_client", "styles", "--url", url],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "tiny_style" in out.stdout and "x8" in out.stdout
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    module, _, name = project["project"]["scripts"]["imgsvc"].partition(":")
    assert getattr(import_module(module), name) is cli
    assert "imgsvc_client*" in project["tool"]["setuptools"]["packages"]["find"]["include"]

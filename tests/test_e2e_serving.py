"""End to end: uvicorn + ``python -m worker`` subprocesses against a real redis-server, with the
tiny zoo. The worker runs in fp32, so its pixels must match ``model_zoo.reference``'s reference path
(within one level out of 255: batching pads and reorders float sums).

Covered here: stylize and upscale sizes and pixels, alpha, output formats, async mode,
concurrent requests, metrics and Server-Timing from real jobs, readiness, Redis stopped and
restarted under a running stack, a timed-out job that is never computed, and ``python -m
service.launch`` start-up and Ctrl-C.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from jobqueue.protocol import Keys
from model_zoo.imaging import tensor_to_uint8, uint8_to_tensor
from model_zoo.reference import run_model
from model_zoo.registry import load_model
from service.launch import Child, free_port, http_status, start_api, start_worker, wait_http

from .conftest import NO_TILED_COST_PROBE, wait_costs_measured

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180.0

WORKER_ENV = {
    "DEVICE": "cpu",
    "PRECISION": "fp32",
    "TORCH_THREADS": "1",
    "MAX_BATCH": "4",
    "MAX_WAIT_MS": "20",
    "HEARTBEAT_INTERVAL_S": "0.5",
    "CLAIM_IDLE_MS": "5000",
    "LOG_LEVEL": "INFO",
    **NO_TILED_COST_PROBE,
}


@dataclass
class Stack:
    """API + workers on one prefix; every child logs to a file shown when something fails."""

    redis_url: str
    zoo: Path
    prefix: str
    logdir: Path
    api_env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    api: Child | None = None
    workers: list[Child] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "QUEUE_PREFIX": self.prefix,
            "MODEL_ZOO_DIR": str(self.zoo),
            "PYTHONUNBUFFERED": "1",
        }

    def _log(self, name: str) -> IO[bytes]:
        handle = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(handle)
        return handle

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
            for p in sorted(self.logdir.glob("*.log"))
        )

    def start_api(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**self.env(), "HOST": "127.0.0.1", "PORT": str(port), **self.api_env}
        self.api = start_api(env, output=self._log("api"), cwd=str(REPO))
        wait_http(self.url + "/healthz", 60, self.api)

    def start_worker(self) -> Child:
        name = f"worker{len(self.workers) + 1}"
        env = {**self.env(), **WORKER_ENV, "WORKER_ID": f"{self.prefix}-{name}"}
        child = start_worker(env, name=name, output=self._log(name), cwd=str(REPO))
        self.workers.append(child)
        return child

    def wait_ready(self) -> None:
        """/readyz, and then no worker still measuring its costs: the tests time jobs and
        publish costs of their own, which a late probe would disturb."""
        try:
            wait_http(self.url + "/readyz", READY_TIMEOUT_S, [c for c in self.children if c])
            wait_costs_measured(self.url, READY_TIMEOUT_S)
        except (RuntimeError, TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from exc

    @property
    def children(self) -> list[Child]:
        return [*self.workers, *([self.api] if self.api else [])]

    def stop(self) -> None:
        for child in self.children:
            child.stop(30)
        for handle in self._logs:
            handle.close()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    @contextmanager
    def running(self, workers: int = 1) -> Iterator[Stack]:
        """The API and ``workers`` workers, ready; everything stopped on the way out."""
        try:
            self.start_api()
            for _ in range(workers):
                self.start_worker()
            if workers:
                self.wait_ready()
            yield self
        finally:
            self.stop()


@contextmanager
def stack_on_a_zoo_copy(
    redis_url: str,
    template: Path,
    tmp_path_factory: pytest.TempPathFactory,
    prefix: str,
    prepare: Callable[[Path], None],
) -> Iterator[Stack]:
    """A running stack on its own copy of the tiny zoo, which ``prepare`` changes first (the
    session's template is shared by the other stacks and must stay as it is)."""
    zoo = tmp_path_factory.mktemp(f"{prefix}-zoo")
    shutil.copytree(template, zoo, dirs_exist_ok=True)
    prepare(zoo)
    logs = tmp_path_factory.mktemp(f"{prefix}-logs")
    with Stack(redis_url, zoo, prefix, logs).running() as service:
        yield service


@pytest.fixture(scope="module")
def stack(
    redis_instance: Any, tiny_zoo_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("e2e-logs")
    with Stack(redis_instance.url, tiny_zoo_template, "e2e", logs).running() as service:
        yield service


@pytest.fixture()
def client(stack: Stack, redis_instance: Any) -> Iterator[httpx.Client]:
    """A client of the running stack, which must be ready (Redis is *not* flushed: the worker's
    consumer group and heartbeat live there)."""
    if redis_instance.process is None:
        redis_instance.start()
    stack.wait_ready()
    with stack.client() as http:
        yield http
    dead = [c.name for c in stack.children if not c.alive]
    assert not dead, f"{dead} died\n{stack.logs()}"


_NETS: dict[tuple[Path, str], Any] = {}


def reference(zoo: Path, model: str, rgb: np.ndarray) -> np.ndarray:
    """``model_zoo.reference``'s fp32 path on an H x W x 3 uint8 array."""
    if (zoo, model) not in _NETS:
        _NETS[(zoo, model)] = load_model(model, root=zoo)[0]
    return tensor_to_uint8(run_model(_NETS[(zoo, model)], uint8_to_tensor(rgb)))[0]


def image_array(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: structure for the nets, no two pixels alike."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256])
    base = base.transpose(1, 2, 0) * 0.7 + rng.integers(0, 77, (height, width, 3))
    rgb = np.clip(base, 0, 255).astype(np.uint8)
    if channels == 4:
        alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
        return np.concatenate([rgb, alpha], axis=2)
    return rgb


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "RGBA" if array.shape[2] == 4 else "RGB").save(buf, "PNG")
    return buf.getvalue()


def decode(resp: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(resp.content)))


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: int = 1) -> None:
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(int) - expected.astype(int))
    assert diff.max() <= tolerance, f"max diff {diff.max()}, mean {diff.mean():.4f}"


def server_timing(resp: httpx.Response) -> dict[str, float]:
    parts = [p.strip().split(";dur=") for p in resp.headers["server-timing"].split(",")]
    return {name: float(value) for name, value in parts}


def post_image(client: httpx.Client, path: str, array: np.ndarray) -> httpx.Response:
    return client.post(path, files={"image": ("in.png", png_bytes(array), "image/png")})


# --- results -----------------------------------------------------------------------------------


def test_ready_with_a_live_worker(stack: Stack, client: httpx.Client) -> None:
    body = client.get("/readyz").json()
    assert body["status"] == "ready" and body["workers"] >= 1 and body["measuring"] == 0
    # A worker that has just started serves while it measures its costs, and says so.
    starting = redis.Redis.from_url(stack.redis_url)
    key = stack.keys.heartbeat("just-started")
    starting.set(key, json.dumps({"worker_id": "just-started", "measuring": ["x4"]}), px=10_000)
    try:
        again = client.get("/readyz").json()
        assert again["workers"] == body["workers"] + 1 and again["measuring"] == 1
    finally:
        starting.delete(key)
        starting.close()


@pytest.mark.parametrize("size", [(40, 24), (33, 17)])
@pytest.mark.parametrize("style", ["tiny_style", "mosaic"])
def test_stylize_matches_the_reference(
    stack: Stack, client: httpx.Client, size: tuple[int, int], style: str
) -> None:
    source = image_array(*size, seed=size[0])
    resp = post_image(client, f"/stylize?style={style}", source)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    out = decode(resp)
    assert out.shape == (size[1], size[0], 3)
    assert_close(out, reference(stack.zoo, style, source))
    timing = server_timing(resp)
    assert {"decode", "queue", "compute", "encode", "total"} <= set(timing)
    assert all(v >= 0 for v in timing.values())
    assert len(resp.headers["x-job-id"]) == 32


@pytest.mark.parametrize("factor", [4, 8])
def test_upscale_matches_the_reference(stack: Stack, client: httpx.Client, factor: int) -> None:
    source = image_array(12, 10, seed=factor)
    resp = client.post(
        f"/upscale?factor={factor}",
        content=png_bytes(source),
        headers={"content-type": "image/png"},
    )
    assert resp.status_code == 200, resp.text
    out = decode(resp)
    assert out.shape == (10 * factor, 12 * factor, 3)
    assert_close(out, reference(stack.zoo, f"x{factor}", source))
    assert resp.headers["x-model"] == f"x{factor}"  # the tiny zoo names no defaults


def test_alpha_is_reattached_after_stylizing(stack: Stack, client: httpx.Client) -> None:
    source = image_array(24, 20, channels=4, seed=7)
    resp = post_image(client, "/stylize?style=tiny_style", source)
    assert resp.status_code == 200, resp.text
    out = decode(resp)
    assert out.shape == (20, 24, 4)
    assert_close(out[..., :3], reference(stack.zoo, "tiny_style", source[..., :3]))
    np.testing.assert_array_equal(out[..., 3], source[..., 3])


def test_alpha_is_upscaled_with_the_image(stack: Stack, client: httpx.Client) -> None:
    source = image_array(10, 8, channels=4, seed=8)
    resp = post_image(client, "/upscale?factor=4", source)
    assert resp.status_code == 200, resp.text
    out = decode(resp)
    assert out.shape == (32, 40, 4)
    assert_close(out[..., :3], reference(stack.zoo, "x4", source[..., :3]))
    alpha = Image.fromarray(source[..., 3], "L").resize((40, 32), Image.Resampling.BICUBIC)
    assert_close(out[..., 3], np.asarray(alpha))


def test_grayscale_and_exif_rotated_inputs(stack: Stack, client: httpx.Client) -> None:
    gray = image_array(16, 12)[..., 0]
    buf = io.BytesIO()
    Image.fromarray(gray, "L").save(buf, "PNG")
    resp = client.post("/stylize?style=tiny_style", files={"image": ("g.png", buf.getvalue())})
    assert resp.status_code == 200, resp.text
    assert_close(decode(resp), reference(stack.zoo, "tiny_style", np.stack([gray] * 3, axis=2)))

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 16 x 12, displayed 12 x 16
    buf = io.BytesIO()
    Image.fromarray(image_array(16, 12)).save(buf, "JPEG", exif=exif, quality=95)
    resp = client.post("/upscale?factor=4", files={"image": ("r.jpg", buf.getvalue())})
    assert resp.status_code == 200, resp.text
    assert decode(resp).shape == (64, 48, 3)


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")],
)
def test_output_formats(client: httpx.Client, fmt: str, content_type: str) -> None:
    # Big enough for the API's gzip (JSON only), which must leave compressed images alone.
    resp = client.post(
        f"/stylize?style=mosaic&format={fmt}",
        files={"image": ("in.png", png_bytes(image_array(64, 48)), "image/png")},
        headers={"Accept-Encoding": "gzip"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == content_type
    assert "content-encoding" not in resp.headers
    assert int(resp.headers["content-length"]) == len(resp.content) > 1024
    with Image.open(io.BytesIO(resp.content)) as img:
        assert img.format == fmt.upper() and img.size == (64, 48)


def test_async_mode(stack: Stack, client: httpx.Client) -> None:
    source = image_array(18, 14, seed=3)
    resp = post_image(client, "/upscale?factor=4&mode=async", source)
    assert resp.status_code == 202, resp.text
    status_url = resp.json()["status_url"]
    deadline = time.monotonic() + 60
    while True:
        result = client.get(status_url)
        if result.status_code != 202:
            break
        assert result.json()["status"] in ("queued", "running")
        assert time.monotonic() < deadline, "async job never finished"
        time.sleep(0.1)
    assert result.status_code == 200, result.text
    assert result.headers["content-type"] == "image/png"
    assert_close(decode(result), reference(stack.zoo, "x4", source))
    assert "compute" in server_timing(result)
    again = client.get(status_url)  # results stay fetchable until their TTL
    assert again.status_code == 200 and again.content == result.content


def test_concurrent_requests_all_get_their_own_result(stack: Stack, client: httpx.Client) -> None:
    sources = [image_array(24, 16, seed=100 + i) for i in range(6)]

    def call(source: np.ndarray) -> httpx.Response:
        with stack.client() as http:
            return post_image(http, "/stylize?style=tiny_style", source)

    with ThreadPoolExecutor(len(sources)) as pool:
        responses = list(pool.map(call, sources))
    for source, resp in zip(sources, responses, strict=True):
        assert resp.status_code == 200, resp.text
        assert_close(decode(resp), reference(stack.zoo, "tiny_style", source))
    assert len({r.headers["x-job-id"] for r in responses}) == len(sources)


def test_metrics_from_real_jobs(client: httpx.Client) -> None:
    assert post_image(client, "/stylize?style=mosaic", image_array(16, 16)).status_code == 200
    text = client.get("/metrics").text

    def value(prefix: str) -> float:
        line = next(ln for ln in text.splitlines() if ln.startswith(prefix))
        return float(line.rsplit(" ", 1)[1])

    assert value('imgsvc_compute_seconds_count{model="mosaic",op="stylize"}') >= 1
    assert value('imgsvc_encode_seconds_count{model="mosaic",op="stylize"}') >= 1
    assert value('imgsvc_queue_wait_seconds_count{model="mosaic",op="stylize"}') >= 1
    assert value('imgsvc_batch_size_count{op="stylize"}') >= 1
    assert value('imgsvc_image_latency_seconds_count{mode="sync",model="mosaic",op="stylize"}') >= 1
    assert value('imgsvc_jobs_total{mode="sync",model="mosaic",op="stylize",outcome="ok"}') >= 1
    assert value('imgsvc_http_requests_total{method="POST",route="/stylize",status="200"}') >= 1
    assert value("imgsvc_live_workers") >= 1
    assert value("imgsvc_redis_up") == 1


# --- failures ----------------------------------------------------------------------------------


def test_redis_restart_gives_503_then_recovers_by_itself(
    stack: Stack, client: httpx.Client, redis_instance: Any
) -> None:
    source = image_array(16, 12, seed=11)
    redis_instance.stop()
    try:
        resp = post_image(client, "/stylize?style=tiny_style", source)
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"] == "queue_unavailable" and resp.headers["retry-after"]
        assert client.get("/readyz").status_code == 503
    finally:
        redis_instance.start()
    # Neither the API nor the worker is restarted: both reconnect on their own.
    stack.wait_ready()
    resp = post_image(client, "/stylize?style=tiny_style", source)
    assert resp.status_code == 200, f"{resp.text}\n{stack.logs()}"
    assert_close(decode(resp), reference(stack.zoo, "tiny_style", source))


def test_timed_out_job_is_never_computed(
    redis_instance: Any, tiny_zoo_template: Path, tmp_path: Path
) -> None:
    """504 after REQUEST_TIMEOUT_S with no worker; a worker started afterwards skips the job
    (cancel marker and deadline) but computes the next one. Own prefix, so the module's stack
    and its Redis state are left alone."""
    if redis_instance.process is None:
        redis_instance.start()
    redis_url = redis_instance.url
    stack = Stack(redis_url, tiny_zoo_template, "e2e_timeout", tmp_path, {"REQUEST_TIMEOUT_S": "1"})
    try:
        stack.start_api()
        with stack.client() as http:
            resp = post_image(http, "/stylize?style=tiny_style", image_array(16, 16))
            assert resp.status_code == 504, resp.text
            cancelled = resp.json()["job_id"]
            stack.start_worker()
            stack.wait_ready()
            later = post_image(http, "/stylize?style=tiny_style&mode=async", image_array(8, 8))
            assert later.status_code == 202
            deadline = time.monotonic() + 60
            while (status := http.get(later.json()["status_url"])).status_code == 202:
                assert time.monotonic() < deadline, stack.logs()
                time.sleep(0.1)
            assert status.status_code == 200, status.text
        r = redis.Redis.from_url(redis_url)
        keys = stack.keys
        assert r.exists(keys.result(cancelled)) == 0, "the cancelled job was computed"
        assert r.exists(keys.done(cancelled)) == 0
        # skipped and removed, not left behind (XACK + XDEL follow the result, so poll briefly)
        deadline = time.monotonic() + 10
        while r.xlen(keys.stream) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.xlen(keys.stream) == 0
    finally:
        stack.stop()


# --- make run ------------------------------------------------------------------------------------


def _children_of(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def test_launch_starts_everything_and_ctrl_c_stops_it(
    tiny_zoo_template: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REDIS_URL", "QUEUE_PREFIX", "PORT")
    }
    env.update(
        {**WORKER_ENV, "PORT": str(port), "MODEL_ZOO_DIR": str(tiny_zoo_template)},
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "launch.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "service.launch"],
            cwd=tmp_path,  # no .env of the repository's
            env={**env, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "ready:" not in log.read_text():
            assert launcher.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert f"http://127.0.0.1:{port}" in text
        redis_url = next(ln for ln in text.splitlines() if "private redis-server" in ln).split()[-1]
        children = _children_of(launcher.pid)
        assert len(children) == 3, children  # redis-server, API, worker
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            resp = post_image(http, "/stylize?style=mosaic", image_array(12, 12))
            assert resp.status_code == 200, resp.text
        launcher.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert launcher.wait(60) == 0, log.read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert "[launch] stopped" in log.read_text()
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        ), f"child {pid} outlived the launcher"
    assert http_status(f"http://127.0.0.1:{port}/healthz") is None
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()

"""The load generator against a real local HTTP server (uvicorn + a tiny FastAPI app that
decodes the upload and answers a PNG with Server-Timing, like the service does)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from PIL import Image

from bench.__main__ import main as bench_main
from bench.loadgen import Bounds, LoadGenerator, Workload, sweep


def _tiny_app() -> FastAPI:
    app = FastAPI()
    state = {"batches": 0, "batch_sum": 0.0, "in_flight": 0}

    async def _answer(request: Request, scale: int) -> Response:
        if request.query_params.get("style") == "overloaded":
            return Response(status_code=503, headers={"Retry-After": "1"})
        form = await request.form()
        upload = form["image"]
        data = await upload.read()  # type: ignore[union-attr]
        with Image.open(io.BytesIO(data)) as img:
            out = img.convert("RGB").resize((img.width * scale, img.height * scale))
        state["in_flight"] += 1
        await asyncio.sleep(0.005)
        batch = state["in_flight"]
        state["in_flight"] -= 1
        state["batches"] += 1
        state["batch_sum"] += batch
        buf = io.BytesIO()
        out.save(buf, format="PNG", compress_level=1)
        timing = f'queue;dur=0.5, compute;dur=5.0, encode;dur=1.0, batch;desc="{batch}"'
        return Response(buf.getvalue(), media_type="image/png", headers={"Server-Timing": timing})

    @app.post("/stylize")
    async def stylize(request: Request) -> Response:
        return await _answer(request, 1)

    @app.post("/upscale")
    async def upscale(request: Request) -> Response:
        return await _answer(request, int(request.query_params.get("factor", "4")))

    @app.get("/metrics")
    async def metrics() -> Response:
        text = (
            f'batch_size_sum{{model="m"}} {state["batch_sum"]}\n'
            f'batch_size_count{{model="m"}} {state["batches"]}\n'
        )
        return Response(text, media_type="text/plain")

    return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[str]:
    port = _free_port()
    config = uvicorn.Config(_tiny_app(), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_closed_loop_sweep_bounded_by_count(tiny_server: str) -> None:
    workload = Workload(endpoint="stylize", style="s", sizes=((32, 32),))
    levels = asyncio.run(
        sweep(
            tiny_server,
            workload,
            concurrencies=[1, 3],
            bounds=Bounds(max_requests=7, max_seconds=30, warmup=1),
            progress=False,
        )
    )
    assert [lvl.concurrency for lvl in levels] == [1, 3]
    for lvl in levels:
        s = lvl.summary()
        assert s["requests"] == 7 and s["ok"] == 7 and s["errors"] == {}
        assert s["server_ms"]["compute"] == pytest.approx(5.0)
        assert s["batch_size_header"] >= 1.0
        assert s["batch_size_metrics"] >= 1.0  # scraped /metrics delta
        assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"]
        assert all(smp.bytes_out > 0 for smp in lvl.samples)


def test_closed_loop_bounded_by_time(tiny_server: str) -> None:
    async def go() -> int:
        async with LoadGenerator(tiny_server, Workload(sizes=((32, 32),))) as gen:
            lvl = await gen.closed_loop(2, Bounds(max_requests=100_000, max_seconds=0.3))
            return len(lvl.samples)

    count = asyncio.run(go())
    assert 0 < count < 100_000


def test_open_loop_mixed_sizes_and_upscale(tiny_server: str) -> None:
    workload = Workload(endpoint="upscale", factor=4, sizes=((16, 16), (24, 8)), seed=3)
    levels = asyncio.run(
        sweep(
            tiny_server,
            workload,
            rates=[50.0],
            bounds=Bounds(max_requests=12, max_seconds=10),
            progress=False,
        )
    )
    (lvl,) = levels
    s = lvl.summary()
    assert s["mode"] == "open" and s["requests"] == 12 and s["ok"] == 12
    assert {smp.size for smp in lvl.samples} == {(16, 16), (24, 8)}
    assert set(s["latency_ms_by_size"]) == {"16x16", "24x8"}
    # x4 of a 24x8 PNG is much larger than x4 of ... at least check outputs are upscaled PNGs
    assert {(smp.size, smp.out_size) for smp in lvl.samples} == {
        ((16, 16), (64, 64)),
        ((24, 8), (96, 32)),
    }


def test_errors_are_counted_by_status(tiny_server: str) -> None:
    workload = Workload(endpoint="stylize", style="overloaded", sizes=((16, 16),))
    (lvl,) = asyncio.run(
        sweep(
            tiny_server,
            workload,
            concurrencies=[2],
            bounds=Bounds(max_requests=4, max_seconds=10),
            progress=False,
        )
    )
    s = lvl.summary()
    assert s["ok"] == 0 and s["errors"] == {"503": 4}
    assert 0 < s["error_p50_ms"]["503"] < 5000  # how long a refusal took to come
    assert all(smp.retry_after == "1" for smp in lvl.samples)


def test_connection_refused_is_an_error_not_a_crash() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    (lvl,) = asyncio.run(
        sweep(
            url,
            Workload(sizes=((8, 8),)),
            concurrencies=[1],
            bounds=Bounds(max_requests=2, max_seconds=5, timeout_s=2),
            progress=False,
        )
    )
    assert lvl.summary()["errors"] == {"connect_error": 2}


def test_cli_load_writes_reports(tiny_server: str, tmp_path: Path) -> None:
    rc = bench_main(
        [
            "load",
            "--url", tiny_server,
            "--sizes", "16,24x16",
            "--concurrency", "1,2",
            "--rate", "20",
            "--requests", "4",
            "--warmup", "0",
            "--out", str(tmp_path),
            "--name", "smoke",
        ]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert [lvl["mode"] for lvl in data["levels"]] == ["closed", "closed", "open"]
    assert all(lvl["ok"] == 4 for lvl in data["levels"])
    md = (tmp_path / "smoke.md").read_text()
    assert md.count("\n| closed |") == 2 and "| open |" in md
    with Image.open(tmp_path / "smoke.png") as img:
        assert img.format == "PNG"

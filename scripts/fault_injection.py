"""Fault injection against a private stack: bad inputs, slow clients, load with worker kills,
a Redis restart and a queue-full burst, big jobs and cancellations; then a ledger that every
accepted job got its answer.

    .venv/bin/python scripts/fault_injection.py            # about 2 minutes on 2 busy cores
    .venv/bin/python scripts/fault_injection.py --out docs/fault_injection.md

Starts its own redis-server (append-only file, like docker-compose.yml), the API and two workers
on free loopback ports, serving the shipped ``multistyle`` (style ``mosaic``) and ``x4`` models
on the CPU, and stops exactly what it started. Only 127.0.0.1 is ever contacted. Exits 1 if any
request got a 5xx other than the expected 503/504 kinds, a bad input got anything but a 4xx
JSON error, a process died unplanned, or an accepted job was lost.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.launch import Child, free_port, spawn, start_api, start_worker, wait_http  # noqa: E402

EXPECTED_5XX = {"queue_full", "queue_unavailable", "not_ready", "timeout", "job_failed"}


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    workdir: Path
    redis_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    redis: Child | None = None
    api: Child | None = None
    workers: list[Child] = field(default_factory=list)
    started_workers: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "QUEUE_PREFIX": "faults",
            "PYTHONUNBUFFERED": "1",
            "HEARTBEAT_INTERVAL_S": "0.5",
            "CLAIM_IDLE_MS": "3000",
        }

    def log(self, name: str) -> Any:
        return open(self.workdir / f"{name}.log", "ab")

    def start_redis(self) -> None:
        argv = [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--dir", str(self.workdir), "--loglevel", "warning",
        ]  # fmt: skip
        self.redis = spawn("redis", argv, output=self.log("redis"))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def start_api(self) -> None:
        env = {
            **self.env(),
            "HOST": "127.0.0.1",
            "PORT": str(self.api_port),
            "MAX_QUEUE_DEPTH": "16",
            "REQUEST_TIMEOUT_S": "30",
            "HEADER_TIMEOUT_S": "3",
            "BODY_TIMEOUT_S": "3",
            "MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
            "WAIT_CHUNK_S": "0.5",
            "REDIS_TIMEOUT_S": "2",
        }
        self.api = start_api(env, output=self.log("api"), cwd=str(REPO))
        wait_http(self.url + "/healthz", 60, self.api)

    def start_worker(self) -> Child:
        self.started_workers += 1
        name = f"worker{self.started_workers}"
        env = {
            **self.env(),
            "WORKER_ID": f"faults-{name}",
            "WORKER_MODELS": "multistyle,x4",
            "DEVICE": "cpu",
            "TORCH_THREADS": "1",
            "TILE_SIZE": "256",
            "METRICS_PORT": "0",
        }
        child = start_worker(env, name=name, output=self.log(name), cwd=str(REPO))
        self.workers.append(child)
        return child

    def stop(self) -> None:
        for child in [*self.workers, self.api, self.redis]:
            if child is not None:
                child.stop(30)


# --- inputs ------------------------------------------------------------------------------------


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def gradient_png(side: int) -> bytes:
    """A large image in a small file (smooth gradients compress well)."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1),
                    np.full((side, side), 128, np.float32)], axis=2)  # fmt: skip
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buf, "JPEG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bad_inputs() -> list[tuple[str, str, dict[str, Any]]]:
    """(name, path, httpx request kwargs): each must get a 4xx JSON error."""
    good_png, good_jpeg = png_bytes(64, 48), jpeg_bytes(64, 48)
    sig = b"\x89PNG\r\n\x1a\n"
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
    zero = _chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))
    bomb = (
        sig
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )

    def up(data: bytes, ctype: str = "image/png") -> dict[str, Any]:
        return {"files": {"image": ("x", data, ctype)}}

    def raw(data: bytes, ctype: str) -> dict[str, Any]:
        return {"content": data, "headers": {"content-type": ctype}}

    too_big = b"\x89PNG" + b"\x00" * (2 * 1024 * 1024 + 10)
    no_field = {"files": {"picture": ("x", good_png, "image/png")}}

    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("empty raw", "/stylize?style=mosaic", raw(b"", "image/png")),
        ("empty file", "/stylize?style=mosaic", up(b"")),
        ("text", "/stylize?style=mosaic", up(b"hello, not pixels")),
        ("signature only", "/stylize?style=mosaic", up(sig)),
        ("header-only png", "/stylize?style=mosaic", up(sig + ihdr)),
        ("0x0 png", "/stylize?style=mosaic", up(sig + zero + _chunk(b"IEND", b""))),
        ("bomb", "/stylize?style=mosaic", up(bomb)),
        ("json body", "/stylize?style=mosaic", raw(b"{}", "application/json")),
        ("no image field", "/stylize?style=mosaic", no_field),
        ("broken multipart", "/stylize?style=mosaic",
         raw(b"--x\r\nabc", "multipart/form-data; boundary=y")),
        ("too many bytes", "/stylize?style=mosaic", raw(too_big, "image/png")),
        ("unknown style", "/stylize?style=nope", up(good_png)),
        ("sr model as style", "/stylize?style=x4", up(good_png)),
        ("style as sr model", "/upscale?factor=4&model=mosaic", up(good_png)),
        ("no style", "/stylize", up(good_png)),
        ("style and mix", "/stylize?style=mosaic&mix=mosaic:1", up(good_png)),
        ("bad mix", "/stylize?mix=mosaic:-1", up(good_png)),
        ("strength 2", "/stylize?style=mosaic&strength=2", up(good_png)),
        ("max_side 1", "/stylize?style=mosaic&max_side=1", up(good_png)),
        ("factor 3", "/upscale?factor=3", up(good_png)),
        ("factor 4.0", "/upscale?factor=4.0", up(good_png)),
        ("factor missing", "/upscale", up(good_png)),
        ("mode later", "/stylize?style=mosaic&mode=later", up(good_png)),
        ("format gif", "/stylize?style=mosaic&format=gif", up(good_png)),
        ("upscale too big", "/upscale?factor=8", up(png_bytes(1100, 20))),
        ("bad job id", "GET /jobs/not-an-id", {}),
        ("unknown job", "GET /jobs/" + "0" * 32, {}),
        ("unknown route", "GET /nope", {}),
        ("wrong method", "GET /stylize", {}),
    ]  # fmt: skip
    for keep in (0.1, 0.3, 0.5, 0.7, 0.9):
        cases.append((f"png cut at {keep:.0%}", "/stylize?style=mosaic",
                      up(good_png[: int(len(good_png) * keep)])))  # fmt: skip
        cases.append((f"jpeg cut at {keep:.0%}", "/upscale?factor=4",
                      up(good_jpeg[: int(len(good_jpeg) * keep)], "image/jpeg")))  # fmt: skip
    rng = random.Random(15)
    for n in range(90):  # bytes flipped in a valid file (CRC or structure broken)
        data = bytearray(good_png if n % 2 else good_jpeg)
        for _ in range(rng.randint(1, 8)):
            index = rng.randrange(8, len(data))
            data[index] = rng.randrange(256)
        cases.append((f"mutated {n}", "/stylize?style=mosaic", up(bytes(data))))
    return cases


# --- phases ------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every job the service accepted, and what became of it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sync: Counter[str] = field(default_factory=Counter)
    async_ids: list[str] = field(default_factory=list)
    async_final: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        with self.lock:
            self.sync[what] += 1


def classify(resp: httpx.Response) -> str:
    try:
        code = resp.json().get("error", "")
    except ValueError:
        code = ""
    return f"{resp.status_code} {code}".strip()


def run_bad_inputs(stack: Stack, report: dict[str, Any]) -> None:
    cases = bad_inputs()
    statuses: Counter[int] = Counter()
    still_decodable = 0
    failures = []
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        for name, path, kwargs in cases:
            get = path.startswith("GET ")
            resp = http.get(path[4:]) if get else http.post(path, **kwargs)
            statuses[resp.status_code] += 1
            still_decodable += name.startswith("mutated") and resp.status_code == 200
            json_error = resp.headers.get("content-type", "").startswith("application/json")
            clear = 400 <= resp.status_code < 500 and json_error and resp.json().get("error")
            # a mutated file may still decode: a 200 is a correct answer for those
            if not clear and not (name.startswith("mutated") and resp.status_code == 200):
                failures.append(f"{name}: {resp.status_code} {resp.text[:120]}")
    report["bad_inputs"] = {
        "tried": len(cases),
        "by_status": dict(sorted(statuses.items())),
        "mutated_but_still_decodable_answered_200": still_decodable,
        "failures": failures,
    }


def run_slow_clients(stack: Stack, report: dict[str, Any]) -> None:
    closed: list[tuple[str, float, bool]] = []

    def client(kind: str) -> None:
        started = time.monotonic()
        got_408 = False
        with socket.create_connection(("127.0.0.1", stack.api_port), timeout=1) as sock:
            if kind == "header":
                sock.sendall(b"POST /upscale?factor=4 HTTP/1.1\r\nHost: x\r\n")
            elif kind == "body":
                sock.sendall(
                    b"POST /upscale?factor=4 HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: image/png\r\nContent-Length: 50000\r\n\r\n"
                )
            for n in range(30):
                try:
                    data = sock.recv(4096)
                    if not data:
                        break
                    got_408 |= data.startswith(b"HTTP/1.1 408")
                except TimeoutError:
                    pass
                except OSError:
                    break
                try:
                    if kind == "header":
                        sock.sendall(f"X-{n}: y\r\n".encode())
                    elif kind == "body":
                        sock.sendall(b"\x00" * 10)
                except OSError:
                    break
        closed.append((kind, time.monotonic() - started, got_408))

    threads = [
        threading.Thread(target=client, args=(k,))
        for k in ["header"] * 5 + ["body"] * 5 + ["silent"]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    report["slow_clients"] = {
        "connections": len(threads),
        "closed_with_408": sum(1 for _, _, ok in closed if ok),
        "longest_s": round(max(s for _, s, _ in closed), 1),
        "timeouts_s": 3,
    }


def load(stack: Stack, ledger: Ledger, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=stack.url, timeout=45) as http:
        while not stop.is_set():
            size = rng.choice([48, 64, 96])
            asynchronous = rng.random() < 0.4
            if rng.random() < 0.5:
                path = "/stylize?style=mosaic"
            else:
                path, size = "/upscale?factor=4", size // 2
            path += "&mode=async" if asynchronous else ""
            try:
                resp = http.post(
                    path, files={"image": ("x.png", png_bytes(size, size, rng.randrange(99)))}
                )
            except httpx.HTTPError as exc:  # the API itself never goes away in this run
                ledger.unexpected.append(f"transport error: {exc!r}")
                continue
            outcome = classify(resp)
            if resp.status_code == 202:
                with ledger.lock:
                    ledger.async_ids.append(resp.json()["job_id"])
                outcome = "202 accepted"
            elif resp.status_code == 503 or resp.status_code == 429:
                time.sleep(float(resp.headers.get("retry-after", "1")) / 4)
            elif resp.status_code >= 500 and outcome.split(" ", 1)[-1] not in EXPECTED_5XX:
                ledger.unexpected.append(f"{path}: {outcome} {resp.text[:200]}")
            ledger.note(outcome)


def follow_async(stack: Stack, ledger: Ledger, deadline_s: float) -> None:
    """Poll every accepted async job to its final answer (through Redis restarts: a 503 from
    the poll is retried)."""
    deadline = time.monotonic() + deadline_s
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        while time.monotonic() < deadline:
            with ledger.lock:
                pending = [j for j in ledger.async_ids if j not in ledger.async_final]
            if not pending:
                return
            for job_id in pending:
                try:
                    resp = http.get(f"/jobs/{job_id}")
                except httpx.HTTPError:
                    continue
                if resp.status_code in (202, 503) and classify(resp) != "503 job_failed":
                    continue
                ledger.async_final[job_id] = classify(resp) if resp.status_code != 200 else "200"
            time.sleep(0.5)


def inject_faults(stack: Stack, report: dict[str, Any], stop: threading.Event) -> None:
    events: list[str] = []
    t0 = time.monotonic()

    def at(seconds: float, what: str, action: Callable[[], None]) -> None:
        while time.monotonic() - t0 < seconds and not stop.is_set():
            time.sleep(0.1)
        action()
        events.append(f"{time.monotonic() - t0:5.1f} s  {what}")

    def kill_worker() -> None:
        victim = stack.workers[0]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        stack.workers.remove(victim)
        stack.start_worker()

    def restart_redis() -> None:
        assert stack.redis is not None
        stack.redis.stop(30)  # SIGTERM: Redis writes its append-only file and exits
        time.sleep(1.0)
        stack.start_redis()

    def drain_worker() -> None:
        victim = stack.workers[0]
        victim.stop(60)  # SIGTERM: the batch in flight is finished and stored
        stack.workers.remove(victim)
        stack.start_worker()

    def burst() -> None:
        """Both workers frozen (SIGSTOP) while 40 jobs arrive at a queue of 16: the queue fills,
        the rest get 503 + Retry-After; then the workers thaw and drain it."""
        for worker in stack.workers:
            worker.process.send_signal(signal.SIGSTOP)

        def one(_: int) -> str:
            with httpx.Client(base_url=stack.url, timeout=30) as http:
                resp = http.post("/upscale?factor=4&mode=async",
                                 files={"image": ("b.png", png_bytes(24, 24))})  # fmt: skip
                if resp.status_code == 202:
                    report.setdefault("burst_ids", []).append(resp.json()["job_id"])
                return classify(resp) if resp.status_code != 202 else "202 accepted"

        threads_out: list[str] = []
        threads = [
            threading.Thread(target=lambda i=i: threads_out.append(one(i))) for i in range(40)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for worker in stack.workers:
            worker.process.send_signal(signal.SIGCONT)
        report["burst"] = dict(Counter(threads_out))

    def big_and_cancel() -> None:
        # Big enough that its estimate (the workers' measured cost) exceeds the synchronous
        # limit, ADMISSION_HEADROOM (0.5) x REQUEST_TIMEOUT_S (30 s), with room: a faster
        # model needs a bigger picture to be refused.
        # >= 2000 px is tiled: the API prices it at the tiled figure, and so does this.
        cost = measured_costs(stack).get("multistyle", {})
        per_mpx = cost.get("tiled") or cost.get("whole") or 10.0
        side = min(6000, max(2000, math.ceil(math.sqrt(2 * 15 / per_mpx * 1e6))))
        report["big_side"] = side
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            big = gradient_png(side)
            refused = http.post(
                "/stylize?style=mosaic", content=big, headers={"content-type": "image/png"}
            )
            accepted = http.post("/stylize?style=mosaic&mode=async", content=big,
                                 headers={"content-type": "image/png"})  # fmt: skip
            report["big_sync"] = classify(refused)
            if accepted.status_code == 202:
                time.sleep(4)
                cancel = http.delete(accepted.json()["status_url"])
                report["big_async_cancel"] = cancel.json().get("status")

    at(5, "SIGKILL worker 1, start a replacement", kill_worker)
    at(14, "big (>= 2000 px) sync (refused?) + async, cancelled after 4 s", big_and_cancel)
    at(22, "restart Redis (SIGTERM, append-only file)", restart_redis)
    at(32, "workers frozen (SIGSTOP), burst of 40 async jobs at a queue of 16, SIGCONT", burst)
    at(40, "SIGTERM worker (drain), start a replacement", drain_worker)
    report["events"] = events


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def measured_costs(stack: Stack) -> dict[str, dict[str, float]]:
    """Each model's published seconds per megapixel, whole and tiled images."""
    import redis

    from jobqueue.protocol import ModelCost

    client = redis.Redis.from_url(stack.env()["REDIS_URL"])
    costs = [ModelCost.decode(value) for value in client.hgetall("faults:costs").values()]
    return {
        cost.model: {
            "whole": round(cost.seconds_per_megapixel, 2),
            "tiled": round(cost.tiled_seconds_per_megapixel, 2),
        }
        for cost in costs
    }


def worker_log_counts(workdir: Path) -> dict[str, int]:
    """What the workers' JSON logs say happened: jobs computed, reclaimed after the kill,
    stopped while running, bulk jobs paused for small ones."""
    counts: Counter[str] = Counter()
    for log in workdir.glob("worker*.log"):
        for line in log.read_text(errors="replace").splitlines():
            try:
                message = json.loads(line).get("message", "")
            except ValueError:
                continue
            if message.startswith("computed "):
                counts["computed"] += 1
            elif message.startswith("reclaimed "):
                counts["reclaimed"] += int(message.split()[1])
            elif "while running: stopped after" in message:
                counts["stopped_while_running"] += 1
            elif message.startswith("bulk job paused"):
                counts["bulk_job_pauses"] += 1
    return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=50.0, help="seconds of load")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="imgsvc-faults-"))
    stack = Stack(workdir)
    report: dict[str, Any] = {}
    ledger = Ledger()
    started = time.monotonic()
    try:
        stack.start_redis()
        stack.start_api()
        stack.start_worker()
        stack.start_worker()
        wait_http(stack.url + "/readyz", 300, [c for c in (stack.api, *stack.workers) if c])
        run_bad_inputs(stack, report)
        run_slow_clients(stack, report)
        stop = threading.Event()
        loaders = [threading.Thread(target=load, args=(stack, ledger, stop, s)) for s in range(3)]
        load_started = time.monotonic()
        for t in loaders:
            t.start()
        # Faults from the main thread: children get SIGTERM when the thread that started them
        # ends (PR_SET_PDEATHSIG, service.launch), so replacements must not come from a thread.
        inject_faults(stack, report, stop)
        time.sleep(max(0.0, args.duration - (time.monotonic() - load_started)))
        stop.set()
        for t in loaders:
            t.join(120)
        with ledger.lock:
            ledger.async_ids.extend(report.get("burst_ids", []))
        follow_async(stack, ledger, 120)
        alive = {c.name: c.alive for c in (stack.api, *stack.workers) if c}
        report["api_peak_rss_mb"] = peak_rss_mb(stack.api.process.pid) if stack.api else None
        report["measured_seconds_per_megapixel"] = measured_costs(stack)
    finally:
        stack.stop()
    lost = [j for j in ledger.async_ids if j not in ledger.async_final]
    report["worker_logs"] = worker_log_counts(workdir)
    report.update(
        wall_s=round(time.monotonic() - started, 1),
        load={"sync_and_submit_answers": dict(ledger.sync.most_common())},
        async_jobs={"accepted": len(ledger.async_ids), "answered": len(ledger.async_final),
                    "final": dict(Counter(ledger.async_final.values())), "lost": len(lost)},
        unexpected=ledger.unexpected,
        processes_alive_at_end=alive,
    )  # fmt: skip
    report.pop("burst_ids", None)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        day = time.strftime("%Y-%m-%d")
        args.out.write_text(
            f"# Fault injection\n\n`scripts/fault_injection.py`, {day}\n\n```json\n{text}\n```\n"
        )
    ok = (
        not report["bad_inputs"]["failures"]
        and not ledger.unexpected
        and not lost
        and all(alive.values())
        and report["slow_clients"]["closed_with_408"] == report["slow_clients"]["connections"]
    )
    print("OK" if ok else "FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

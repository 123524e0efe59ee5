"""A private serving stack for the benchmarks: redis-server, the API and workers as subprocesses.

The batching and end-to-end benchmarks must compare configurations on the same machine in one
run, so they start everything themselves on free loopback ports, with their own zoo folder and
queue prefix, and stop exactly the processes they started (each in its own process group, so a
worker's children go too). Nothing here touches a Redis or service it did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StackError(RuntimeError):
    """A process of the stack did not come up; the message carries the tail of its log."""


@dataclass
class Proc:
    """One child process with its log file (so a failure can be explained, not just reported)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (the worker drains its batch), then SIGKILL of its process group."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        self.popen = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Stack:
    """redis-server + ``python -m service`` + N x ``python -m worker``.

    ``worker_env`` is applied to the workers only (e.g. ``MAX_BATCH``); ``restart_workers``
    swaps the workers' configuration while Redis and the API stay up.
    """

    zoo_dir: Path
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-stack-")))
    api_env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    redis_port: int = 0
    api_port: int = 0
    prefix: str = "bench"
    redis: Proc | None = None
    api: Proc | None = None
    workers: list[Proc] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "REDIS_URL": self.redis_url,
                "QUEUE_PREFIX": self.prefix,
                "MODEL_ZOO_DIR": str(self.zoo_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def start(self, worker_env: dict[str, str] | None = None, workers: int = 1) -> None:
        self.start_redis()
        self.start_api()
        self.start_workers(worker_env or {}, workers)

    def start_redis(self) -> None:
        binary = shutil.which("redis-server") or os.environ.get("REDIS_SERVER_BIN")
        if not binary:
            raise StackError("redis-server not found (scripts/setup.sh installs it)")
        self.redis_port = self.redis_port or free_port()
        argv = [
            binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        self.redis = Proc("redis", argv, dict(os.environ), self.workdir / "redis.log")
        self.redis.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not self.redis.alive:
                raise StackError(f"redis-server exited:\n{self.redis.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.3) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise StackError("redis-server did not answer PING in 15 s")

    def start_api(self) -> None:
        self.api_port = self.api_port or free_port()
        env = self._base_env()
        env.update({"HOST": "127.0.0.1", "PORT": str(self.api_port), **self.api_env})
        self.api = Proc("api", [self.python, "-m", "service"], env, self.workdir / "api.log")
        self.api.start()
        self._wait_http("/healthz", self.api, timeout_s=60)

    def start_workers(self, worker_env: dict[str, str], count: int = 1) -> None:
        for i in range(count):
            env = self._base_env()
            env.update(worker_env)
            log = self.workdir / f"worker{len(self.workers)}.log"
            proc = Proc(f"worker{i}", [self.python, "-m", "worker"], env, log)
            proc.start()
            self.workers.append(proc)

    def wait_ready(self, timeout_s: float = 180.0, workers: int = 1) -> None:
        """Until /readyz reports ``workers`` live heartbeats (models loaded and warmed up)."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            for proc in [self.api, *self.workers]:
                if proc is not None and not proc.alive:
                    raise StackError(f"{proc.name} exited:\n{proc.log_tail()}")
            try:
                resp = httpx.get(self.url + "/readyz", timeout=3)
                last = resp.text
                if resp.status_code == 200 and int(resp.json().get("workers", 0)) >= workers:
                    return
            except (httpx.HTTPError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.25)
        tails = "\n".join(f"--- {p.name}\n{p.log_tail(1500)}" for p in self.workers)
        raise StackError(f"stack not ready in {timeout_s:g} s (last /readyz: {last})\n{tails}")

    def stop_workers(self) -> None:
        for proc in self.workers:
            proc.stop()
        self.workers = []
        # a stopped worker's heartbeat key lives on until its TTL: clear it so /readyz waits
        # for the next worker instead of believing the old one
        self._clear_heartbeats()

    def restart_workers(self, worker_env: dict[str, str], count: int = 1) -> None:
        self.stop_workers()
        self.start_workers(worker_env, count)
        self.wait_ready(workers=count)

    def _clear_heartbeats(self) -> None:
        try:
            import redis

            from jobqueue.protocol import Keys

            client = redis.Redis.from_url(self.redis_url, socket_timeout=3)
            keys = list(client.scan_iter(match=Keys(self.prefix).heartbeat_pattern))
            if keys:
                client.delete(*keys)
            client.close()
        except Exception:  # best effort: readiness then just takes a heartbeat TTL longer
            pass

    def stop(self) -> None:
        for proc in self.workers:
            proc.stop()
        self.workers = []
        for proc in (self.api, self.redis):
            if proc is not None:
                proc.stop()

    def _wait_http(self, path: str, proc: Proc, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not proc.alive:
                raise StackError(f"{proc.name} exited:\n{proc.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise StackError(f"{proc.name} did not answer {path} in {timeout_s:g} s")

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_bench_zoo(
    root: Path, *, style: str = "mosaic", tiny: bool = False, source: str | None = None
) -> tuple[Path, str]:
    """The zoo the stack serves: ``source`` (or the package zoo) if it has ``style``, ``x4`` and
    ``x8``; else a fresh folder of untrained nets from the default (or tiny) configs.

    Returns the folder and a note saying which, for the report.
    """
    from model_zoo.manifest import read_manifest

    if not tiny:
        names = set(read_manifest(source).names())
        if {style, "x4", "x8"} <= names:
            from model_zoo.manifest import zoo_dir

            return zoo_dir(source), "trained zoo models"
    import torch

    from model_zoo.config import SRNetConfig, StyleNetConfig
    from model_zoo.nets import build_net
    from model_zoo.registry import save_model

    torch.manual_seed(0)
    style_cfg = StyleNetConfig(base_channels=8, num_residual=1) if tiny else StyleNetConfig()
    save_model(build_net(style_cfg), name=style, kind="style", arch=style_cfg, root=root)
    for factor in (4, 8):
        cfg = (
            SRNetConfig(factor=factor, channels=8, num_residual=1)  # type: ignore[arg-type]
            if tiny
            else SRNetConfig(factor=factor)  # type: ignore[arg-type]
        )
        save_model(build_net(cfg), name=f"x{factor}", kind="sr", arch=cfg, root=root, factor=factor)
    return root, ("tiny" if tiny else "default-config") + " untrained nets (speed only)"

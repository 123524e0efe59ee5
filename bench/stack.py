"""A private serving stack for the benchmarks: redis-server, the API and workers as subprocesses.

The batching and end-to-end benchmarks must compare configurations on the same machine in one
run, so they start everything themselves on free loopback ports, with their own zoo folder and
queue prefix, and stop exactly the processes they started (the service's launcher also makes
each child die with its parent). Nothing here touches a Redis or service it did not start.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import httpx
import redis

if TYPE_CHECKING:
    from jobqueue.protocol import StyleControls

from jobqueue.protocol import Keys
from service.launch import Child, free_port, start_api, start_redis, start_worker, wait_http

REPO_ROOT = Path(__file__).resolve().parent.parent


class StackError(RuntimeError):
    """A process of the stack did not come up; the message carries the tail of its log."""


@dataclass
class Stack:
    """redis-server + ``python -m service`` + N x ``python -m worker``, started with the
    service's own launcher helpers (``service.launch``), each child logging to a file.

    ``worker_env`` is applied to the workers only (e.g. ``MAX_BATCH``); ``restart_workers``
    swaps the workers' configuration while Redis and the API stay up.
    """

    zoo_dir: Path
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-stack-")))
    api_env: dict[str, str] = field(default_factory=dict)
    redis_config: dict[str, str] = field(default_factory=dict)
    """Applied with CONFIG SET after start (e.g. ``hz``), to measure a Redis setting's effect."""
    prefix: str = "bench"
    redis_url: str = ""
    api_port: int = 0
    redis: Child | None = None
    api: Child | None = None
    workers: list[Child] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)
    _generation: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _log(self, name: str) -> IO[bytes]:
        handle = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(handle)
        return handle

    def log_tail(self, name: str, chars: int = 2500) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

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
        self.wait_ready(workers=workers)

    def start_redis(self) -> None:
        try:
            self.redis, self.redis_url = start_redis(output=self._log("redis"))
        except (RuntimeError, TimeoutError) as exc:
            raise StackError(f"redis-server: {exc}\n{self.log_tail('redis')}") from exc
        if self.redis_config:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=3)
            try:
                for key, value in self.redis_config.items():
                    client.config_set(key, value)
            finally:
                client.close()

    def redis_info(self) -> dict[str, str]:
        """The Redis settings that shape queue latency, for the report."""
        client = redis.Redis.from_url(self.redis_url, socket_timeout=3, decode_responses=True)
        try:
            return {k: str(v) for k, v in client.config_get("hz").items()}
        finally:
            client.close()

    def start_api(self) -> None:
        self.api_port = self.api_port or free_port()
        env = self._base_env()
        env.update({"HOST": "127.0.0.1", "PORT": str(self.api_port), **self.api_env})
        self.api = start_api(env, output=self._log("api"), cwd=str(REPO_ROOT))
        try:
            wait_http(self.url + "/healthz", 60.0, self.api)
        except (RuntimeError, TimeoutError) as exc:
            raise StackError(f"API: {exc}\n{self.log_tail('api')}") from exc

    def start_workers(self, worker_env: dict[str, str], count: int = 1) -> None:
        for _ in range(count):
            self._generation += 1
            name = f"worker{self._generation}"
            env = self._base_env()
            env.update(worker_env)
            self.workers.append(
                start_worker(env, name=name, output=self._log(name), cwd=str(REPO_ROOT))
            )

    def wait_ready(self, timeout_s: float = 240.0, workers: int = 1) -> None:
        """Until /readyz reports ``workers`` live heartbeats with their costs measured: a
        worker serves while it measures them, but a benchmark must not time its probes."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            for child in [self.api, *self.workers]:
                if child is not None and not child.alive:
                    raise StackError(f"{child.name} exited:\n{self.log_tail(child.name)}")
            try:
                resp = httpx.get(self.url + "/readyz", timeout=3)
                last = resp.text
                body = resp.json() if resp.status_code == 200 else {}
                if int(body.get("workers", 0)) >= workers and not body.get("measuring"):
                    return
            except (httpx.HTTPError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.25)
        tails = "\n".join(f"--- {c.name}\n{self.log_tail(c.name, 1500)}" for c in self.workers)
        raise StackError(f"stack not ready in {timeout_s:g} s (last /readyz: {last})\n{tails}")

    def wait_workers_redis(self, count: int = 1, timeout_s: float = 240.0) -> None:
        """Without an API: until ``count`` worker heartbeats are in Redis, none of them still
        measuring its costs."""
        client = redis.Redis.from_url(self.redis_url, socket_timeout=3)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                for child in self.workers:
                    if not child.alive:
                        raise StackError(f"{child.name} exited:\n{self.log_tail(child.name)}")
                pattern = Keys(self.prefix).heartbeat_pattern
                beats = [client.get(key) for key in client.scan_iter(match=pattern)]
                live = [json.loads(beat) for beat in beats if beat]
                if len(live) >= count and not any(beat.get("measuring") for beat in live):
                    return
                time.sleep(0.25)
        finally:
            client.close()
        raise StackError(f"no worker heartbeat in {timeout_s:g} s")

    def stop_workers(self) -> None:
        for child in self.workers:
            child.stop(30.0)
        self.workers = []
        # a stopped worker's heartbeat key lives on until its TTL: clear it so /readyz waits
        # for the next worker instead of believing the old one
        self._clear_heartbeats()

    def restart_workers(self, worker_env: dict[str, str], count: int = 1) -> None:
        self.stop_workers()
        self.start_workers(worker_env, count)
        self.wait_ready(workers=count)

    def _clear_heartbeats(self) -> None:
        if not self.redis_url:
            return
        client = redis.Redis.from_url(self.redis_url, socket_timeout=3)
        try:
            keys = list(client.scan_iter(match=Keys(self.prefix).heartbeat_pattern))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass  # readiness then just takes one heartbeat TTL longer
        finally:
            client.close()

    def stop(self) -> None:
        """Workers first (they drain), then the API, then Redis."""
        for child in [*self.workers, self.api, self.redis]:
            if child is not None:
                child.stop(30.0)
        self.workers, self.api, self.redis = [], None, None
        for handle in self._logs:
            handle.close()
        self._logs = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def served_style(zoo: Path, style: str) -> tuple[str, StyleControls]:
    """The net and ``StyleControls`` the API queues for ``style=NAME`` (a multi-style slot is
    its net plus the slot's weight row), so a bench that bypasses HTTP runs what users get."""
    from jobqueue.protocol import StyleControls
    from model_zoo.manifest import read_manifest
    from model_zoo.styles import resolve_style

    choice = resolve_style(read_manifest(zoo), style, None)
    return choice.model, StyleControls(slots=choice.slots, identity=choice.identity)


def make_bench_zoo(
    root: Path, *, style: str = "mosaic", tiny: bool = False, source: str | None = None
) -> tuple[Path, str]:
    """The zoo the stack serves: ``source`` (or the package zoo) if it serves ``style`` (a net of
    its own or a slot of a multi-style net: what users get) and has ``x4`` and ``x8``; else a
    fresh folder of untrained nets from the default (or tiny) configs.

    Returns the folder and a note saying which, for the report.
    """
    from model_zoo.manifest import read_manifest

    if not tiny:
        manifest = read_manifest(source)
        if style in manifest.styles() and {"x4", "x8"} <= set(manifest.names()):
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

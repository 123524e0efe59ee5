"""``python -m service.launch`` (``make run``): the whole service on one machine.

Starts, as child processes: a private ``redis-server`` on a free port (unless ``REDIS_URL`` is set,
in the environment or ``.env``), the API (``python -m service``) on ``PORT`` and ``--workers``
workers (``python -m worker``). Ctrl-C or SIGTERM stops all of it: workers first (SIGTERM lets
them finish the batch in flight), then the API, then Redis. If any child dies, the rest are
stopped too, so a half-running service never lingers.

The private Redis keeps nothing on disk (``--save "" --appendonly no``, in a temporary folder):
it is a queue between processes of this run, not a database. The helpers here are also what the
end-to-end tests use to start real processes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import redis

from jobqueue.settings import redacted_url
from service.settings import ApiSettings

REDIS_SERVER = os.environ.get("REDIS_SERVER_BIN", "redis-server")
_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    """A started child process with a name for messages."""

    name: str
    process: subprocess.Popen[bytes]
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait(5)
        for fn in self.cleanup:
            fn()
        self.cleanup.clear()
        return self.process.returncode


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the launcher dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    name: str,
    argv: list[str],
    *,
    env: Mapping[str, str] | None = None,
    output: IO[Any] | int | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Child:
    """Start ``argv`` in its own session, so a terminal's Ctrl-C reaches only the launcher,
    which then stops the children in order."""
    process = subprocess.Popen(
        argv,
        env=dict(env) if env is not None else None,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    return Child(name, process)


def start_redis(
    port: int | None = None, *, output: IO[Any] | int | None = subprocess.DEVNULL
) -> tuple[Child, str]:
    """A throw-away redis-server on 127.0.0.1; returns the child and its URL once it answers."""
    if shutil.which(REDIS_SERVER) is None:
        raise RuntimeError(f"{REDIS_SERVER} not found; install redis-server or set REDIS_URL")
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="imgsvc-redis-")
    argv = [
        REDIS_SERVER,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", workdir,
        "--daemonize", "no",
        "--loglevel", "warning",
    ]  # fmt: skip
    child = spawn("redis", argv, output=output)
    child.cleanup.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        _wait_for(lambda: _redis_answers(client), 15.0, child, "redis-server")
    except BaseException:
        child.stop()
        raise
    finally:
        client.close()
    return child, url


def _redis_answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def start_api(
    env: Mapping[str, str], *, output: IO[Any] | int | None = None, cwd: str | None = None
) -> Child:
    """``python -m service`` with ``env`` (set ``REDIS_URL``, ``PORT``, ``HOST``, limits...)."""
    return spawn("api", [sys.executable, "-m", "service"], env=env, output=output, cwd=cwd)


def start_worker(
    env: Mapping[str, str],
    *,
    name: str = "worker",
    output: IO[Any] | int | None = None,
    cwd: str | None = None,
) -> Child:
    """``python -m worker`` with ``env`` (it reads ``REDIS_URL``, ``QUEUE_PREFIX``,
    ``MODEL_ZOO_DIR`` like the API)."""
    return spawn(name, [sys.executable, "-m", "worker"], env=env, output=output, cwd=cwd)


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """Status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def wait_http(
    url: str, timeout: float, watch: Child | Sequence[Child] = (), expect: int = 200
) -> None:
    """Poll ``url`` until it answers ``expect``; fail early if a watched child exits."""
    _wait_for(lambda: http_status(url) == expect, timeout, watch, url)


def _wait_for(
    check: Callable[[], bool], timeout: float, watch: Child | Sequence[Child], what: str
) -> None:
    watched = [watch] if isinstance(watch, Child) else list(watch)
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        for child in watched:
            if not child.alive:
                raise RuntimeError(
                    f"{child.name} exited ({child.process.returncode}) before {what} was ready"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:g} s")
        time.sleep(0.1)


def stop_all(children: list[Child], timeout: float = 15.0) -> None:
    """Stop in reverse start order: consumers before the Redis they talk to."""
    for child in reversed(children):
        child.stop(timeout)


class _Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.launch", description=__doc__)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--no-worker", action="store_true", help="API (and Redis) only")
    parser.add_argument(
        "--ready-timeout", type=float, default=300.0, help="seconds to wait for /readyz"
    )
    args = parser.parse_args(argv)
    settings = ApiSettings()
    children: list[Child] = []

    def on_signal(signum: int, _frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        env = dict(os.environ)
        if "redis_url" in settings.model_fields_set:
            print(f"[launch] using Redis at {redacted_url(settings.redis_url)}", flush=True)
        else:
            redis_child, url = start_redis()
            children.append(redis_child)
            env["REDIS_URL"] = url
            print(f"[launch] private redis-server at {url}", flush=True)
        env["PORT"] = str(settings.port)
        env["HOST"] = settings.host
        env.setdefault("QUEUE_PREFIX", settings.queue_prefix)
        if settings.model_zoo_dir is not None:
            env.setdefault("MODEL_ZOO_DIR", str(settings.model_zoo_dir))
        api = start_api(env)
        children.append(api)
        workers = 0 if args.no_worker else max(0, args.workers)
        metrics_base = int(env.get("METRICS_PORT", "9100") or 0)
        for index in range(workers):
            # Each worker serves its metrics on its own port (9100, 9101, ...; 0 = none).
            worker_env = {**env, "METRICS_PORT": str(metrics_base + index if metrics_base else 0)}
            children.append(start_worker(worker_env, name=f"worker-{index}"))
        shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        base = f"http://{shown}:{settings.port}"
        wait_http(f"{base}/healthz", 60.0, api)
        print(f"[launch] API listening on {base}  (docs: {base}/docs)", flush=True)
        if workers:
            wait_http(f"{base}/readyz", args.ready_timeout, children)
            print(f"[launch] ready: {workers} worker(s) serving. Ctrl-C stops everything.")
            print(
                f"[launch] try: curl -F image=@photo.jpg '{base}/stylize?style=mosaic' -o out.png",
                flush=True,
            )
        while True:
            for child in children:
                if not child.alive:
                    print(
                        f"[launch] {child.name} exited ({child.process.returncode}); stopping",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
            time.sleep(0.5)
    except _Stop as stop:
        print(f"[launch] {stop}: stopping", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"[launch] error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all(children)
        print("[launch] stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())

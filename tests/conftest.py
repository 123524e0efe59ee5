"""Shared fixtures: a real redis-server per test session and a zoo of tiny untrained models.

Tiny models keep the suite fast on a 2-core CPU while exercising the same code paths (registry,
sha256 check, architecture rebuild) as the trained ones.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from model_zoo.config import MultiStyleNetConfig, SRNetConfig, StyleNetConfig
from model_zoo.manifest import StyleSlot
from model_zoo.nets import ConditionalInstanceNorm2d, build_net
from model_zoo.registry import save_model

# Tests share two cores with whatever else runs; more threads than that only adds contention.
torch.set_num_threads(2)

NO_TILED_COST_PROBE = {"COST_PROBE_TILED_SCALE": "0"}
"""For workers started by tests that do not look at costs: the tiled cost probe takes ~6 s per
model on a 2-core CPU at start-up (~18 s a worker); ``test_serving_limits`` tests it."""


def wait_costs_measured(url: str, timeout: float) -> None:
    """Until ``url``'s /readyz counts no worker still measuring its costs. A worker serves
    while it measures them, but tests that time jobs or publish costs of their own must not
    meet a late probe."""
    deadline = time.monotonic() + timeout
    while (body := httpx.get(url + "/readyz", timeout=10).json()).get("measuring"):
        assert time.monotonic() < deadline, f"workers still measuring their costs: {body}"
        time.sleep(0.1)


TINY_STYLE = StyleNetConfig(base_channels=8, num_residual=1)
TINY_SR = {
    4: SRNetConfig(factor=4, channels=8, num_residual=1),
    # The shipped SR models add their output to a bicubic upscale; x8 covers that head.
    8: SRNetConfig(factor=8, channels=8, num_residual=1, output="bicubic_residual"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server process that tests may stop and restart on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not installed (scripts/setup.sh installs it)")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()


@pytest.fixture(scope="session")
def redis_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_server(redis_instance: RedisServer) -> Iterator[str]:
    """URL of a running redis-server, emptied before each test."""
    if redis_instance.process is None or redis_instance.process.poll() is not None:
        redis_instance.start()
    redis_instance.flush()
    yield redis_instance.url


def make_tiny_zoo(root: Path) -> Path:
    """Tiny untrained models under the names the service uses: style ``tiny_style`` and
    ``mosaic``, SR ``x4`` and ``x8``. Seeded so every run builds the same weights."""
    torch.manual_seed(0)
    for name in ("tiny_style", "mosaic"):
        net = build_net(TINY_STYLE)
        save_model(
            net,
            name=name,
            kind="style",
            arch=TINY_STYLE,
            root=root,
            description=f"tiny untrained test model {name}",
        )
    for factor, config in TINY_SR.items():
        net = build_net(config)
        # Untrained BatchNorm running stats are identity; give them non-trivial values so
        # tests notice if a path forgets eval mode.
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        if config.output == "bicubic_residual":  # zero-initialised: it would be plain bicubic
            torch.nn.init.normal_(net.tail.conv.weight, std=0.02)
        save_model(
            net,
            name=f"x{factor}",
            kind="sr",
            arch=config,
            root=root,
            factor=factor,
            loss="feat",
            description=f"tiny untrained x{factor} test model",
        )
    return root


# A narrower decoder than the encoder's mirror, as the shipped distilled net has: every engine
# path (padded batches, tiles, OpenVINO's two exports) must follow the configured widths.
TINY_MULTISTYLE = MultiStyleNetConfig(
    num_styles=3, channels=(8, 8, 8), num_residual=1, outer_kernel=5, decoder_channels=(8, 4)
)


def add_tiny_multistyle(root: Path, seed: int = 0) -> None:
    """A tiny untrained multi-style net ``tiny_multi``: slot 0 identity, styles ``ms_a`` and
    ``ms_b``. Its conditional tables are randomised so the slots really differ."""
    torch.manual_seed(seed)
    net = build_net(TINY_MULTISTYLE)
    for module in net.modules():
        if isinstance(module, ConditionalInstanceNorm2d):
            module.scale.data.uniform_(0.5, 1.5)
            module.shift.data.uniform_(-0.5, 0.5)
    save_model(
        net,
        name="tiny_multi",
        kind="style",
        arch=TINY_MULTISTYLE,
        root=root,
        description="tiny untrained multi-style test model",
        styles=[
            StyleSlot(name="identity", index=0, role="identity"),
            StyleSlot(name="ms_a", index=1),
            StyleSlot(name="ms_b", index=2),
        ],
    )


def add_tiny_pixel_sr(root: Path, seed: int) -> None:
    """A tiny x4 pixel-loss model beside the defaults, for tests that compare SR variants."""
    torch.manual_seed(seed)
    save_model(
        build_net(TINY_SR[4]),
        name="x4_pixel",
        kind="sr",
        arch=TINY_SR[4],
        root=root,
        factor=4,
        loss="pixel",
    )


@pytest.fixture(scope="session")
def tiny_zoo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_zoo(tmp_path_factory.mktemp("zoo-template"))


@pytest.fixture()
def tiny_zoo(tiny_zoo_template: Path) -> Iterator[Path]:
    """A private copy of the tiny zoo (tests may modify it)."""
    directory = Path(tempfile.mkdtemp(prefix="tiny-zoo-"))
    shutil.copytree(tiny_zoo_template, directory, dirs_exist_ok=True)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Environment without settings that would leak between tests."""
    for key in list(os.environ):
        if key in {"MODEL_ZOO_DIR", "VGG16_WEIGHTS", "REDIS_URL"}:
            monkeypatch.delenv(key)
    return monkeypatch

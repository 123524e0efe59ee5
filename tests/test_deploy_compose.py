"""docker-compose.yml, validated by a real Compose implementation (Debian's ``docker-compose``,
which checks the schema and references without a Docker engine), then checked for what the
service needs: a healthy Redis with persistence first, an API whose healthcheck is /readyz on
its own port, published on the loopback interface only, with keys, quotas and restricted metrics;
workers that reserve a GPU, can be scaled and export metrics that Prometheus scrapes; and
settings that both sides read.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import ApiSettings
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
SHARED = (
    "REDIS_URL", "QUEUE_PREFIX", "MODEL_ZOO_DIR", "RESULT_TTL_S", "HEARTBEAT_INTERVAL_S",
    "CLAIM_IDLE_MS", "LOG_FORMAT",
)  # fmt: skip
# Compose turns on what `make run` leaves off (README, "Deployment"); everything else it sets
# must equal the settings' own defaults.
COMPOSE_OVERRIDES = {
    "HOST", "REDIS_URL", "MODEL_ZOO_DIR", "AUTH_REQUIRED", "API_KEYS_FILE", "METRICS_ACCESS",
    "DOCS_ACCESS", "RATE_LIMIT_PER_MINUTE", "METRICS_HOST",
}  # fmt: skip


def published(port: Any) -> tuple[str, int, int]:
    """(host ip, published port, container port) of a compose port, short or long form."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "0.0.0.0")), int(port["published"]), int(port["target"])
    parts = str(port).split("/")[0].split(":")
    host = parts[0] if len(parts) == 3 else "0.0.0.0"
    return host, int(parts[-2]), int(parts[-1])


def compose_binary() -> str:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is required (Debian: apt-get install -y docker-compose)"
    return binary


def run_compose(*args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    # A minimal environment and an empty env file: the file's own defaults are what is tested,
    # not whatever this shell or a developer's .env happens to set.
    return subprocess.run(
        [compose_binary(), "--env-file", str(env_file), "-f", str(COMPOSE), *args],
        cwd=REPO,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(env_file.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env_file = tmp_path_factory.mktemp("compose") / "empty.env"
    env_file.write_text("")
    quiet = run_compose("config", "--quiet", env_file=env_file)
    assert quiet.returncode == 0, quiet.stderr
    resolved = run_compose("config", env_file=env_file)
    assert resolved.returncode == 0, resolved.stderr
    return yaml.safe_load(resolved.stdout)


def test_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator is real: the same file with a misspelt GPU key fails."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("capabilities: [gpu]", "capabilitys: [gpu]"))
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    result = subprocess.run(
        [compose_binary(), "--env-file", str(env_file), "-f", str(broken), "config", "--quiet"],
        cwd=tmp_path,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "capabilitys" in result.stderr


def test_services_and_build_files(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {"redis", "api", "worker", "prometheus"}
    for name in ("api", "worker"):
        build = services[name]["build"]
        assert Path(build["context"]) == REPO
        assert (REPO / build["dockerfile"]).is_file(), build
        assert build["dockerfile"] == f"docker/{name}.Dockerfile"


def test_redis_is_healthchecked_and_persistent(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    volume = next(v for v in redis["volumes"] if v.split(":")[1] == "/data")
    assert volume.split(":")[0] in config["volumes"]  # a named volume, not the container's fs


def test_api_health_port_and_dependencies(config: dict[str, Any]) -> None:
    api = config["services"]["api"]
    env = api["environment"]
    port = int(env["PORT"])
    assert env["HOST"] == "0.0.0.0"
    assert [published(p)[2] for p in api["ports"]] == [port]
    check = " ".join(api["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in check
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_reserves_a_gpu_and_can_scale(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # `--scale worker=N` needs no fixed name and no host port per container
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert int(worker["stop_grace_period"].rstrip("s")) >= 30  # room to drain on SIGTERM


def test_environment_is_consistent_with_both_settings(config: dict[str, Any]) -> None:
    api = config["services"]["api"]
    worker = config["services"]["worker"]
    api_fields = {name.upper() for name in ApiSettings.model_fields}
    worker_fields = {name.upper() for name in WorkerSettings.model_fields}
    assert set(api["environment"]) <= api_fields, set(api["environment"]) - api_fields
    assert set(worker["environment"]) <= worker_fields, set(worker["environment"]) - worker_fields
    for key in SHARED:
        assert api["environment"][key] == worker["environment"][key], key
    assert api["environment"]["REDIS_URL"].startswith("redis://redis:")  # the service's name
    zoo = api["environment"]["MODEL_ZOO_DIR"]
    for service in (api, worker):
        assert any(v.split(":")[1] == zoo for v in service["volumes"]), "zoo not mounted"
    # Defaults written in the compose file are the settings' own defaults.
    for settings, service in ((ApiSettings, api), (WorkerSettings, worker)):
        for key, value in service["environment"].items():
            if key in COMPOSE_OVERRIDES:
                continue
            default = settings.model_fields[key.lower()].default
            assert str(default) == str(value) or float(default) == float(value), key


def test_api_is_published_on_loopback_only(config: dict[str, Any]) -> None:
    """Exposure: the API listens on 0.0.0.0 inside its container, but the host publishes it on
    127.0.0.1 (a TLS proxy in front decides what the world sees); Prometheus likewise."""
    for name in ("api", "prometheus"):
        for port in config["services"][name]["ports"]:
            assert published(port)[0] == "127.0.0.1", (name, port)


def test_compose_turns_on_keys_quotas_and_restricted_metrics(config: dict[str, Any]) -> None:
    env = config["services"]["api"]["environment"]
    assert env["AUTH_REQUIRED"] == "true"
    assert float(env["RATE_LIMIT_PER_MINUTE"]) > 0
    assert env["METRICS_ACCESS"] == "admin" and env["DOCS_ACCESS"] in ("key", "admin")
    secret = env["API_KEYS_FILE"]
    assert secret == "/run/secrets/api_keys"
    assert {"source": "api_keys"} in config["services"]["api"]["secrets"]
    assert "api_keys" in config["secrets"] and "metrics_key" in config["secrets"]
    # the settings as compose gives them are valid (keys file and restricted metrics agree)
    ApiSettings(
        _env_file=None,  # type: ignore[call-arg]
        auth_required=True,
        api_keys_file=secret,
        metrics_access=env["METRICS_ACCESS"],
        docs_access=env["DOCS_ACCESS"],
    )


def test_prometheus_scrapes_the_api_and_every_worker(config: dict[str, Any]) -> None:
    prometheus = config["services"]["prometheus"]
    config_file = ":/etc/prometheus/prometheus.yml:ro"
    mount = next(v for v in prometheus["volumes"] if v.endswith(config_file))
    scrape = yaml.safe_load(Path(mount.split(":")[0]).read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    api_job = jobs["imgsvc-api"]
    api_port = int(config["services"]["api"]["environment"]["PORT"])
    assert api_job["static_configs"][0]["targets"] == [f"api:{api_port}"]
    # /metrics needs an admin key: Prometheus sends the metrics_key secret
    assert api_job["authorization"]["credentials_file"] == "/run/secrets/metrics_key"
    assert {"source": "metrics_key"} in prometheus["secrets"]
    worker = config["services"]["worker"]
    worker_port = int(worker["environment"]["METRICS_PORT"])
    assert worker["environment"]["METRICS_HOST"] == "0.0.0.0"
    (dns,) = jobs["imgsvc-worker"]["dns_sd_configs"]
    assert dns["names"] == ["worker"] and dns["port"] == worker_port  # follows --scale

"""ApiSettings: environment over .env over defaults, and refusal of inconsistent values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import ApiSettings

NAMES = [name.upper() for name in ApiSettings.model_fields]


@pytest.fixture()
def no_settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env unless the test writes one
    return monkeypatch


def test_defaults(no_settings_env: pytest.MonkeyPatch) -> None:
    s = ApiSettings()
    assert s.port == 8000 and s.queue_prefix == "imgsvc"
    assert s.max_upload_bytes == 20 * 1024 * 1024
    assert s.max_style_pixels == 4096 * 4096
    assert s.max_upscale_output_side == 8192
    assert s.max_upscale_input_side(4) == 2048 and s.max_upscale_input_side(8) == 1024
    assert s.keys.stream == "imgsvc:jobs"
    assert "redis_url" not in s.model_fields_set  # what the launcher checks


def test_environment_beats_dotenv(no_settings_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PORT=9001\nQUEUE_PREFIX=fromfile\nUNRELATED=1\n")
    no_settings_env.setenv("QUEUE_PREFIX", "fromenv")
    no_settings_env.setenv("MODEL_ZOO_DIR", str(tmp_path))
    s = ApiSettings()
    assert s.port == 9001 and s.queue_prefix == "fromenv" and s.model_zoo_dir == tmp_path
    assert s.keys.heartbeat_pattern == "fromenv:worker:*"


def test_redis_url_from_environment_is_marked_as_given(no_settings_env: pytest.MonkeyPatch) -> None:
    no_settings_env.setenv("REDIS_URL", "redis://elsewhere:6380/1")
    s = ApiSettings()
    assert s.redis_url == "redis://elsewhere:6380/1" and "redis_url" in s.model_fields_set


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "0"),
        ("MAX_QUEUE_DEPTH", "0"),
        ("REQUEST_TIMEOUT_S", "-1"),
        ("QUEUE_PREFIX", "has space"),
        ("MAX_UPLOAD_BYTES", "lots"),
        ("WAIT_CHUNK_S", "10"),  # not below REDIS_TIMEOUT_S (5): BLPOP would be cut off
    ],
)
def test_bad_values_are_refused(no_settings_env: pytest.MonkeyPatch, name: str, value: str) -> None:
    no_settings_env.setenv(name, value)
    with pytest.raises(ValidationError):
        ApiSettings()


def test_shared_settings_are_validated_alike_on_both_sides(
    no_settings_env: pytest.MonkeyPatch,
) -> None:
    """CLAIM_IDLE_MS >= 2 x HEARTBEAT_INTERVAL_S is one rule in jobqueue.settings: the API and
    the worker refuse the same inconsistent pair."""
    from worker.settings import WorkerSettings

    no_settings_env.setenv("HEARTBEAT_INTERVAL_S", "2")
    no_settings_env.setenv("CLAIM_IDLE_MS", "3000")
    for settings in (ApiSettings, WorkerSettings):
        with pytest.raises(ValidationError, match="CLAIM_IDLE_MS"):
            settings()
    no_settings_env.setenv("CLAIM_IDLE_MS", "4000")
    assert ApiSettings().claim_idle_ms == WorkerSettings().claim_idle_ms == 4000
    assert ApiSettings().redis_url == WorkerSettings().redis_url  # one default


@pytest.mark.parametrize("name", ["AUTH_REQUIRED", "METRICS_ACCESS", "DOCS_ACCESS"])
def test_restricting_anything_needs_keys(no_settings_env: pytest.MonkeyPatch, name: str) -> None:
    no_settings_env.setenv(name, "true" if name == "AUTH_REQUIRED" else "admin")
    with pytest.raises(ValidationError, match="API_KEYS"):
        ApiSettings()
    no_settings_env.setenv("API_KEYS", "ops:secret-key:admin")
    ApiSettings()


def test_key_files_hold_hashes_and_bad_lines_stop_the_api(tmp_path: Path) -> None:
    import subprocess
    import sys

    from service.keys import KeyFileError, KeyStore

    made = subprocess.run(
        [sys.executable, "-m", "service.keys", "new", "carol", "--scope", "admin"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    key = made.stderr.strip().rsplit(" ", 1)[1]
    assert key not in made.stdout  # only the hash goes to the file
    keyfile = tmp_path / "keys"
    keyfile.write_text(made.stdout)
    store = KeyStore.load("dev:dev-key-1", keyfile)
    found = store.find(key)
    assert found is not None and found.name == "carol" and found.allows("admin")
    dev = store.find("dev-key-1")
    assert dev is not None and dev.allows("jobs") and not dev.allows("admin")
    assert store.find("nope") is None
    hashed = made.stdout.split()[1]
    for bad in ("carol plaintext-key\n", "carol sha256:abc\n", f"c {hashed} root\n"):
        keyfile.write_text(bad)
        with pytest.raises(KeyFileError):
            KeyStore.load("", keyfile)


def test_redis_password_never_reaches_a_log_line() -> None:
    """Kubernetes passes the Redis password inside REDIS_URL; the lines that print the URL
    (the worker's start-up line, the launcher's) print it without the password."""
    from jobqueue.settings import redacted_url

    secret = "0123456789abcdef"
    assert redacted_url(f"redis://:{secret}@imgsvc-redis:6379/0") == (
        "redis://:***@imgsvc-redis:6379/0"
    )
    assert secret not in redacted_url(f"rediss://default:{secret}@[::1]:6380/2")
    assert redacted_url(f"rediss://default:{secret}@[::1]:6380/2").startswith(
        "rediss://default:***@[::1]:6380/2"
    )
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"

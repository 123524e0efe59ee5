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

"""Settings: each bad value names its variable; flags win over the environment.

Pure: no broker, no store, no socket (the last test starts ``sessionq serve``,
which refuses the bad value before it connects to anything).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import UNIT

from server.settings import Settings, SettingsError


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"SESSIONQ_PORT": "70000"}, "SESSIONQ_PORT"),
        ({"SESSIONQ_PORT": "http"}, "SESSIONQ_PORT"),
        ({"SESSIONQ_BROKER_URL": "redis://x"}, "SESSIONQ_BROKER_URL"),
        ({"SESSIONQ_STORE_URL": "mysql://x"}, "SESSIONQ_STORE_URL"),
        ({"SESSIONQ_ENV": "production"}, "SESSIONQ_JWT_SECRET"),
        ({"SESSIONQ_ENV": "production", "SESSIONQ_JWT_SECRET": "short"}, "SESSIONQ_JWT_SECRET"),
        ({"SESSIONQ_MAX_PENDING": "0"}, "SESSIONQ_MAX_PENDING"),
        ({"SESSIONQ_OPEN_REGISTRATION": "maybe"}, "SESSIONQ_OPEN_REGISTRATION"),
        ({"SESSIONQ_LOG_FORMAT": "xml"}, "SESSIONQ_LOG_FORMAT"),
        ({"SESSIONQ_AMQP_CHANNELS": "5000"}, "SESSIONQ_AMQP_CHANNELS"),
        ({"SESSIONQ_MAX_ATTEMPTS": "1"}, "SESSIONQ_MAX_ATTEMPTS"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        Settings.from_env(env)


def test_settings_read_the_environment_and_flags_win() -> None:
    settings = Settings.from_env(
        {"SESSIONQ_PORT": "9000", "SESSIONQ_ALLOWED_ORIGINS": "https://a, https://b",
         "SESSIONQ_OPEN_REGISTRATION": "false", "SESSIONQ_MAX_SLEEP": "2.5"},
        port="9100",
    )  # fmt: skip
    assert settings.port == 9100
    assert settings.allowed_origins == ("https://a", "https://b")
    assert settings.open_registration is False and settings.max_sleep == 2.5


async def test_serve_with_a_bad_setting_exits_2_with_a_clear_message() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "serve", "--max-pending", "-3",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 2 * UNIT)
    assert proc.returncode == 2
    assert b"SESSIONQ_MAX_PENDING" in err and b"greater than 0" in err


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"token_ttl": 86_401}, "SESSIONQ_TOKEN_TTL"),
        ({"tls_cert": "/etc/hostname"}, "SESSIONQ_TLS_KEY"),
        ({"tls_key": "/etc/hostname"}, "SESSIONQ_TLS_CERT"),
        ({"tls_cert": "/nonexistent.pem", "tls_key": "/etc/hostname"}, "SESSIONQ_TLS_CERT"),
        ({"metrics_port": 70_000}, "SESSIONQ_METRICS_PORT"),
        ({"metrics_port": 8765}, "SESSIONQ_METRICS_PORT"),
    ],
)
def test_identity_and_transport_settings_are_checked(values: dict[str, Any], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(environ={}, **values)


def test_registration_is_open_in_development_and_closed_in_production() -> None:
    assert Settings.from_env(environ={}).registration_open
    production = Settings.from_env(environ={}, env="production", jwt_secret="s" * 32)
    assert not production.registration_open
    opened = Settings.from_env(
        environ={"SESSIONQ_OPEN_REGISTRATION": "true"}, env="production", jwt_secret="s" * 32
    )
    assert opened.registration_open


def test_a_short_generated_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "jwt-secret").write_text("short")
    with pytest.raises(SettingsError, match="shorter than 32 bytes"):
        Settings.from_env(environ={}).secret_for(tmp_path)


def test_a_generated_secret_is_kept_and_reused(tmp_path: Path) -> None:
    first = Settings.from_env(environ={}).secret_for(tmp_path)
    again = Settings.from_env(environ={}).secret_for(tmp_path)
    assert len(first.jwt_secret) >= 32 and first.jwt_secret == again.jwt_secret
    assert [p.name for p in tmp_path.iterdir()] == ["jwt-secret"]  # no temp file left

"""Settings: each bad value names its variable; flags win over the environment.

Pure: no broker, no store, no socket (the last test starts ``sessionq serve``,
which refuses the bad value before it connects to anything).
"""

from __future__ import annotations

import asyncio
import sys

import pytest
from conftest import UNIT

from server.settings import Settings, SettingsError


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"SESSIONQ_PORT": "70000"}, "SESSIONQ_PORT"),
        ({"SESSIONQ_PORT": "http"}, "SESSIONQ_PORT"),
        ({"SESSIONQ_BROKER_URL": "redis://x"}, "SESSIONQ_BROKER_URL"),
        ({"SESSIONQ_STORE_URL": "postgres://x"}, "SESSIONQ_STORE_URL"),
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

"""Settings: one frozen dataclass, built once at start and passed down.

Every field is a ``SESSIONQ_*`` environment variable and a flag of
``sessionq serve`` (flags win over the environment). Values are validated in
:func:`Settings.from_env` / :meth:`Settings.with_overrides`, and each bad value
stops the start with a message naming the variable.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A setting has a value the server cannot start with."""


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    store_url: str = "sqlite:///var/sessionq.db"
    jwt_secret: str = ""
    env: str = "development"
    token_ttl: int = 900
    max_pending: int = 1000
    max_message_bytes: int = 1_048_576
    auth_timeout: float = 10.0
    max_connections_per_user: int = 10
    max_submits_per_second: float = 0.0
    max_sleep: float = 60.0
    shutdown_grace: float = 5.0
    workers: int = 1
    max_attempts: int = 3
    result_ttl: int = 86_400
    allowed_origins: tuple[str, ...] = ()
    open_registration: bool = True
    ops: tuple[str, ...] = ()
    log_format: str = "auto"
    log_level: str = "INFO"
    # Not in DESIGN.md's table; documented in docs/operations.md.
    op_timeout: float = 300.0
    amqp_channels: int = 16
    prefetch: int = 16
    batch_max: int = 64
    publish_timeout: float = 5.0
    slow_client_timeout: float = 10.0
    lease_seconds: float = 15.0
    compression: bool = False
    login_failures: int = 5
    login_window: float = 60.0
    auth_tries: int = 5
    bcrypt_rounds: int = 12
    keepalive: float = 20.0

    @property
    def production(self) -> bool:
        return self.env == "production"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``SESSIONQ_*`` variables, apply ``overrides`` (CLI flags, tests)
        and validate. Raises SettingsError naming the bad variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = env_name(f.name)
            if name in env and env[name] != "":
                values[f.name] = _convert(f.name, env[name])
        for key, value in overrides.items():
            if value is None:
                continue
            if isinstance(value, str) and key not in ("host", "jwt_secret"):
                value = _convert(key, value)
            values[key] = value
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        def bad(name: str, why: str) -> SettingsError:
            return SettingsError(f"{env_name(name)}: {why}")

        if not 0 <= self.port <= 65535:
            raise bad("port", "must be 0..65535")
        if not self.broker_url.startswith(("amqp://", "amqps://")):
            raise bad("broker_url", "must start with amqp:// or amqps://")
        stores = ("sqlite:///", "mongodb://", "mongodb+srv://", "postgresql://", "postgres://")
        if not self.store_url.startswith(stores):
            raise bad("store_url", "must be sqlite:///path, mongodb://... or postgresql://...")
        if self.env not in ("development", "production"):
            raise bad("env", "must be development or production")
        if self.production and len(self.jwt_secret.encode()) < 32:
            raise bad("jwt_secret", "must be set to at least 32 bytes in production")
        positive = (
            "token_ttl", "max_pending", "max_message_bytes", "auth_timeout",
            "max_connections_per_user", "workers", "max_attempts", "result_ttl",
            "op_timeout", "amqp_channels", "prefetch", "batch_max", "publish_timeout",
            "slow_client_timeout", "lease_seconds", "login_failures", "login_window",
            "auth_tries", "bcrypt_rounds", "keepalive",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise bad(name, "must be greater than 0")
        for name in ("max_submits_per_second", "max_sleep", "shutdown_grace"):
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if self.max_message_bytes < 1024:
            raise bad("max_message_bytes", "must be at least 1024")
        if self.log_format not in ("auto", "text", "json"):
            raise bad("log_format", "must be auto, text or json")
        if self.log_level.upper() not in ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"):
            raise bad("log_level", "must be DEBUG, INFO, WARNING or ERROR")
        if not 4 <= self.bcrypt_rounds <= 31:
            raise bad("bcrypt_rounds", "must be 4..31")
        if self.max_attempts < 2:
            # Results are written in groups: a process that dies just after
            # finishing a request may leave that request charged with the
            # crash (docs/protocol.md, "Delivery guarantee"). With one attempt
            # that would end it `crashed` although it never crashed.
            raise bad("max_attempts", "must be at least 2")
        if self.amqp_channels > 2000:
            raise bad("amqp_channels", "RabbitMQ allows 2047 channels per connection")

    def secret_for(self, store_dir: Path | None) -> Settings:
        """Return settings with a JWT secret: the given one, or in development
        one generated once and kept in ``jwt-secret`` beside the SQLite store
        (so tokens survive restarts and are shared by ``--workers``)."""
        if self.jwt_secret:
            return self
        if self.production:
            raise SettingsError("SESSIONQ_JWT_SECRET: required in production")
        directory = store_dir or Path("var")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "jwt-secret"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_urlsafe(48).encode())
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        return dataclasses.replace(self, jwt_secret=path.read_text().strip())


def env_name(field_name: str) -> str:
    return "SESSIONQ_" + field_name.upper()


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "allowed_origins": _csv,
    "ops": _csv,
    "open_registration": _bool,
    "compression": _bool,
}


def _convert(name: str, raw: str) -> Any:
    kinds = {f.name: f.type for f in fields(Settings)}
    if name not in kinds:
        raise SettingsError(f"unknown setting {name!r}")
    convert = _CONVERTERS.get(name)
    if convert is None:
        kind = kinds[name]
        convert = {"int": int, "float": float}.get(str(kind), str)
    try:
        return convert(raw)
    except ValueError as exc:
        raise SettingsError(f"{env_name(name)}={raw!r}: {exc}") from None

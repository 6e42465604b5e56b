"""Settings: one frozen dataclass, built once at start and passed down.

Every field is a ``SESSIONQ_*`` environment variable and a flag of
``sessionq serve`` (flags win over the environment). Values are validated in
:func:`Settings.from_env` / :meth:`Settings.with_overrides`, and each bad value
stops the start with a message naming the variable.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from server.broker_urls import split_broker_urls

MAX_TOKEN_TTL = 86_400  # a stolen token is good for a day at the most


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
    # None: open in development, closed in production (see registration_open)
    open_registration: bool | None = None
    ops: tuple[str, ...] = ()
    log_format: str = "auto"
    log_level: str = "INFO"
    tls_cert: str = ""  # PEM files: with both, the one port serves wss:// and https://
    tls_key: str = ""
    metrics_port: int = 0  # 0: /metrics on the public port; else there alone
    metrics_host: str = "127.0.0.1"
    max_result_bytes: int = 1_048_576  # one final frame, encoded (result_too_large beyond)
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
    register_per_minute: int = 20
    cpu_slots_per_user: int = 1
    # -- identity: token lifecycle and client addresses
    token_notice: int = 60  # seconds before expiry for token_expiring
    jwt_issuer: str = "sessionq"
    jwt_audience: str = "sessionq"
    # Peers (addresses or CIDR ranges) whose X-Forwarded-For names the client.
    trusted_proxies: tuple[str, ...] = ()
    # Per-user budgets, across every process and replica on one store.
    max_sessions_per_user: int = 20  # open or draining sessions (4429 beyond)
    max_pending_per_user: int = 5000  # unfinished requests, all sessions (queue_full)
    kv_max_value_bytes: int = 65_536  # one kv.put value, JSON-encoded (bad_request)
    kv_max_bytes_per_user: int = 16_777_216  # keys plus values (quota_exceeded)

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def registration_open(self) -> bool:
        """Whether clients may ``register``: as set, else only outside production."""
        if self.open_registration is None:
            return not self.production
        return self.open_registration

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def security_summary(self) -> str:
        """One line for the start-up log: which protections are in force."""
        secret = (
            f"{len(self.jwt_secret.encode())}-byte JWT secret" if self.jwt_secret else "no secret"
        )
        parts = [
            f"env {self.env}",
            "registration " + ("open" if self.registration_open else "closed"),
            secret,
            "TLS on" if self.tls else "TLS off (terminate it in front)",
            f"metrics on {self.metrics_host}:{self.metrics_port} only"
            if self.metrics_port
            else "metrics on the public port",
            f"token TTL {self.token_ttl}s",
        ]
        return "security: " + ", ".join(parts)

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
        try:  # one URL, or the nodes of a cluster, comma-separated
            split_broker_urls(self.broker_url)
        except ValueError as exc:
            raise bad("broker_url", str(exc)) from None
        stores = ("sqlite:///", "mongodb://", "mongodb+srv://", "postgresql://", "postgres://")
        if not self.store_url.startswith(stores):
            raise bad("store_url", "must be sqlite:///path, mongodb://... or postgresql://...")
        if self.env not in ("development", "production"):
            raise bad("env", "must be development or production")
        if self.production and len(self.jwt_secret.encode()) < 32:
            raise bad("jwt_secret", "must be set to at least 32 bytes in production")
        if self.token_ttl > MAX_TOKEN_TTL:
            raise bad("token_ttl", f"must be at most {MAX_TOKEN_TTL} seconds (24 h)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise bad("tls_cert" if not self.tls_cert else "tls_key",
                      "TLS needs both SESSIONQ_TLS_CERT and SESSIONQ_TLS_KEY")  # fmt: skip
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise bad(name, f"cannot read {path}")
        if not 0 <= self.metrics_port <= 65535:
            raise bad("metrics_port", "must be 0 (off) or a port number")
        if self.metrics_port and self.metrics_port == self.port:
            raise bad("metrics_port", "must differ from SESSIONQ_PORT")
        positive = (
            "token_ttl", "max_pending", "max_message_bytes", "auth_timeout",
            "max_connections_per_user", "workers", "max_attempts", "result_ttl",
            "op_timeout", "amqp_channels", "prefetch", "batch_max", "publish_timeout",
            "slow_client_timeout", "lease_seconds", "login_failures", "login_window",
            "auth_tries", "bcrypt_rounds", "keepalive", "max_result_bytes",
        )  # fmt: skip
        budgets = (
            "max_sessions_per_user", "max_pending_per_user", "kv_max_value_bytes",
            "kv_max_bytes_per_user",
        )  # fmt: skip
        for name in (*positive, *budgets):
            if getattr(self, name) <= 0:
                raise bad(name, "must be greater than 0")
        for name in ("max_submits_per_second", "max_sleep", "shutdown_grace"):
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if self.register_per_minute < 0:
            raise bad("register_per_minute", "must not be negative (0 = unlimited)")
        if self.cpu_slots_per_user < 1:
            raise bad("cpu_slots_per_user", "must be at least 1")
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
        if self.token_notice < 0:
            raise bad("token_notice", "must not be negative (0 = no notice)")
        for name in ("jwt_issuer", "jwt_audience"):
            if not getattr(self, name).strip():
                raise bad(name, "must not be empty")
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise bad("trusted_proxies", f"{entry!r} is not an address or CIDR range") from None
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
            _write_secret(path)
        secret = path.read_text().strip()
        if len(secret.encode()) < 32:
            raise SettingsError(
                f"{path}: the generated JWT secret is shorter than 32 bytes;"
                " delete the file to make a new one, or set SESSIONQ_JWT_SECRET"
            )
        return dataclasses.replace(self, jwt_secret=secret)


def _write_secret(path: Path) -> None:
    """Write a new secret atomically: a reader (another ``--workers`` process)
    sees no file or the whole secret, never an empty or partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_urlsafe(48).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process got there first: keep its secret
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def env_name(field_name: str) -> str:
    return "SESSIONQ_" + field_name.upper()


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "allowed_origins": _csv,
    "ops": _csv,
    "open_registration": _bool,
    "compression": _bool,
    "trusted_proxies": _csv,
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

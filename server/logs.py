"""Structured logging with loguru.

Human-readable lines on a TTY, JSON lines otherwise (or when asked). Session and
user ids are bound to log records with ``logger.bind(session=..., user=...)``.
Nothing is logged per frame on the hot path at INFO.

A JSON line is one flat object (docs/operations.md, "Logs", lists the fields):
``ts`` (RFC 3339, milliseconds and UTC offset), ``level``, ``msg``, ``logger``
(the module), ``pid``, then every bound field at the top level, and ``exc``
(the traceback text) when an exception was logged. A bound field whose name
is one of those keys is written with a trailing underscore (``msg_``) rather
than overwrite it.

Tracebacks never show local variables (``diagnose=False`` on every sink):
locals hold tokens, passwords and request arguments. Warnings of libraries
that log through the standard ``logging`` module (aio-pika, aiormq) go to the
same sink, so a JSON stream stays JSON.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any, TextIO

import orjson
from loguru import logger

TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "{process} <cyan>{name}</cyan> {message} <dim>{extra}</dim>"
)

RESERVED = frozenset(("ts", "level", "msg", "logger", "pid", "exc"))


def json_line(record: Any) -> bytes:
    """One loguru record as one flat JSON object and a newline."""
    out: dict[str, Any] = {
        "ts": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "msg": record["message"],
        "logger": record["name"],
        "pid": record["process"].id,
    }
    for key, value in record["extra"].items():
        out[key + "_" if key in RESERVED else key] = value
    exception = record["exception"]
    if exception is not None and exception.type is not None:
        out["exc"] = "".join(
            traceback.format_exception(exception.type, exception.value, exception.traceback)
        ).rstrip("\n")
    return orjson.dumps(out, default=str, option=orjson.OPT_APPEND_NEWLINE)


class JsonSink:
    """A loguru sink that writes :func:`json_line` of each record to ``stream``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, message: Any) -> None:
        self.stream.write(json_line(message.record).decode())

    def flush(self) -> None:
        self.stream.flush()


class _StdlibToLoguru(logging.Handler):
    """Forwards records of the standard ``logging`` module to loguru, under
    the standard logger's name."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        name = record.name

        def named(r: Any) -> None:
            r["name"] = name

        logger.patch(named).opt(exception=record.exc_info).log(level, record.getMessage())


def configure(log_format: str = "auto", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send logs to ``stream`` (stderr) in the chosen format. Safe to call again."""
    out = stream if stream is not None else sys.stderr
    logger.remove()
    as_json = log_format == "json" or (log_format == "auto" and not out.isatty())
    # No locals in tracebacks (diagnose) and no frames above the catch point
    # (backtrace): both would print variables' values, secrets included.
    if as_json:
        logger.add(
            JsonSink(out), level=level.upper(), format="{message}", colorize=False,
            diagnose=False, backtrace=False,
        )  # fmt: skip
    else:
        logger.add(
            out, level=level.upper(), format=TEXT_FORMAT, colorize=None,
            diagnose=False, backtrace=False,
        )  # fmt: skip
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibToLoguru)]:
        root.removeHandler(handler)
    root.addHandler(_StdlibToLoguru(logging.WARNING))

"""Structured logging with loguru.

Human-readable lines on a TTY, JSON lines otherwise (or when asked). Session and
user ids are bound to log records with ``logger.bind(session=..., user=...)``.
Nothing is logged per frame on the hot path at INFO.
"""

from __future__ import annotations

import sys

from loguru import logger

TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "{process} <cyan>{name}</cyan> {message} <dim>{extra}</dim>"
)


def configure(log_format: str = "auto", level: str = "INFO") -> None:
    """Send logs to stderr in the chosen format. Safe to call again."""
    logger.remove()
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    if as_json:
        # format= shapes the record's "text" field: the same line as on a TTY.
        logger.add(
            sys.stderr, level=level.upper(), format=TEXT_FORMAT, colorize=False, serialize=True
        )
    else:
        logger.add(sys.stderr, level=level.upper(), format=TEXT_FORMAT, colorize=None)

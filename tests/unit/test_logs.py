"""JSON log lines: one flat object per line, and no secrets from tracebacks."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
import pytest
from loguru import logger

from server import logs


class Stream(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture
def json_out() -> Iterator[Stream]:
    """Logs as JSON lines into a buffer; the test suite's own set-up after."""
    out = Stream()
    logs.configure("json", "DEBUG", stream=out)
    yield out
    logs.configure("text", "WARNING")


def lines(out: Stream) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def _open_vault(token: str) -> None:
    secret = "pw-" + token  # a local the traceback must not show
    raise ValueError("vault refused: " + str(len(secret)) + " chars")


def _token() -> str:
    """A value spelled nowhere in this file (the traceback quotes source lines)."""
    return "-".join(["tok", str(6 * 7), "zz"])


def test_a_record_is_one_flat_object_with_bound_fields_and_the_traceback(
    json_out: Stream,
) -> None:
    log = logger.bind(session="s-1", user="alice", seq=7, op="echo", code="timeout")
    try:
        _open_vault(_token())
    except ValueError:
        log.exception("op {} failed", "echo")
    (line,) = lines(json_out)
    assert set(line) == {
        "ts", "level", "msg", "logger", "pid", "session", "user", "seq", "op", "code", "exc"
    }  # fmt: skip
    assert line["level"] == "ERROR"
    assert line["msg"] == "op echo failed"
    assert line["logger"] == __name__
    assert (line["session"], line["user"], line["seq"], line["op"], line["code"]) == (
        "s-1", "alice", 7, "echo", "timeout"
    )  # fmt: skip
    ts = datetime.fromisoformat(line["ts"])
    assert ts.utcoffset() is not None  # RFC 3339: with its offset
    assert len(line["ts"].split(".")[1]) == len("123+00:00")  # milliseconds
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert "_open_vault" in line["exc"]
    assert line["exc"].endswith("ValueError: vault refused: 12 chars")


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_tracebacks_do_not_show_local_variables(log_format: str) -> None:
    out = Stream()
    logs.configure(log_format, "DEBUG", stream=out)
    try:
        try:
            _open_vault(_token())
        except ValueError:
            logger.exception("failed")
    finally:
        logs.configure("text", "WARNING")
    text = out.getvalue()
    assert "vault refused" in text
    assert "tok-42-zz" not in text


def test_a_bound_field_does_not_overwrite_the_line_s_own_keys(json_out: Stream) -> None:
    logger.bind(msg="bound", level="x").info("the message")
    (line,) = lines(json_out)
    assert (line["msg"], line["level"]) == ("the message", "INFO")
    assert (line["msg_"], line["level_"]) == ("bound", "x")
    assert "exc" not in line


def test_standard_logging_warnings_become_json_lines_too(json_out: Stream) -> None:
    logging.getLogger("aiormq.connection").warning("Unexpected connection close from %s", "x")
    logging.getLogger("aiormq.connection").info("below the threshold")
    (line,) = lines(json_out)
    assert (line["logger"], line["level"], line["msg"]) == (
        "aiormq.connection", "WARNING", "Unexpected connection close from x"
    )  # fmt: skip

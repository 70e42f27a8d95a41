"""Logging set-up: one rendering for structlog and Tornado's stdlib loggers (issue 2, point 7)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from sseproxy import config, logs


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_json_when_not_a_terminal_for_structlog_and_tornado_lines() -> None:
    out = io.StringIO()
    logs.configure(config.LoggingSettings(format="auto"), out)
    structlog.contextvars.bind_contextvars(request_id="r1")
    structlog.get_logger("sseproxy.stream").info("stream", outcome="completed")
    logging.getLogger("tornado.access").info("200 GET / (127.0.0.1) 1.00ms")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["event"] == "stream" and lines[0]["request_id"] == "r1"
    assert lines[0]["logger"] == "sseproxy.stream" and lines[0]["level"] == "info"
    assert lines[1]["logger"] == "tornado.access" and lines[1]["request_id"] == "r1"
    assert all("timestamp" in line for line in lines)


def test_console_on_a_terminal() -> None:
    out = TTY()
    logs.configure(config.LoggingSettings(format="auto"), out)
    structlog.get_logger("x").info("hello", k=1)
    text = out.getvalue()
    assert "hello" in text and "k" in text
    with pytest.raises(ValueError):
        json.loads(text)


def test_tracebacks_carry_no_local_variables() -> None:
    out = io.StringIO()
    logs.configure(config.LoggingSettings(format="json"), out)
    secret = "sk-do-not-log"  # noqa: F841  # a local the traceback must not show
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("tornado.application").exception("Uncaught exception")
    line = json.loads(out.getvalue())
    assert line["exception"][0]["exc_type"] == "RuntimeError"
    assert "sk-do-not-log" not in out.getvalue()


def test_level_and_quiet_http_client() -> None:
    out = io.StringIO()
    logs.configure(config.LoggingSettings(format="json", level="warning"), out)
    structlog.get_logger("x").info("dropped")
    logging.getLogger("httpx").info("HTTP Request: POST ...")
    structlog.get_logger("x").warning("kept")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["kept"]

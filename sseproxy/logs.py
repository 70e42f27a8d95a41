"""Logging: structlog configured once, and the standard library (Tornado's loggers) rendered alike.

Output is JSON lines when stderr is not a terminal (``logging.format = auto``)
and a readable console format on a terminal. ``request_id`` and ``stream_id``
are bound per request through :mod:`structlog.contextvars`, so every line a
request logs carries them. Tornado's ``tornado.access``, ``tornado.application``
and ``tornado.general`` records go through the same processors, so one parser
reads every line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

from .config import LoggingSettings


def add_pid(logger: Any, method: str, event_dict: Any) -> Any:
    """Every line names its process (several workers may share one log)."""
    event_dict.setdefault("pid", os.getpid())
    return event_dict


def _processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        add_pid,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure(settings: LoggingSettings, stream: TextIO | None = None) -> None:
    """Configure structlog and the root logger (call once at start-up)."""
    stream = stream or sys.stderr
    fmt = settings.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        # Tracebacks as data, without local variables: those may hold prompts or keys.
        exceptions: list[Any] = [structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))]
    else:
        renderer = structlog.dev.ConsoleRenderer()
        exceptions = []
    shared = _processors()

    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exceptions,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # httpx logs every request at INFO; the canonical stream line already says it all.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))

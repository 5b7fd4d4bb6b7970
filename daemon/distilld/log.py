"""Structured JSON logging with structlog: one line per event on stdout.

This module owns the process-global logging configuration (structlog keeps it
globally); nothing else configures logging. Alert events go through
:func:`distilld.telemetry.alerts.alert`, which marks them ``alert: true`` so an operator
can filter the alert log with one expression (``jq 'select(.alert)'``).
Every string in an event is cut to :data:`distilld.echo.LOG_FIELD_CHARS`
before it is rendered, so no received value makes a line of unbounded length.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from distilld.echo import clip_fields

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING}


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Configure structlog once for the process (JSON lines, or coloured for a console)."""
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _bounded,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.ERROR)),
        logger_factory=_StdoutLogger,
        cache_logger_on_first_use=False,
    )
    # kafka-python logs through the standard library; keep only its warnings,
    # on stderr, so stdout stays one JSON event per line.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def _bounded(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
    """Every string of the event clipped (a field may echo a received value)."""
    return {key: clip_fields(value) for key, value in event.items()}


class _StdoutLogger:
    """Writes each rendered event as one line to whatever ``sys.stdout`` is *now*
    (structlog's PrintLogger keeps the stream it was created with, which breaks
    when stdout is swapped, as pytest's capture does), flushed at once so that
    a supervisor reading a pipe sees events as they happen."""

    def __init__(self, *_args: Any) -> None:
        pass

    def msg(self, message: str) -> None:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def get_logger(component: str) -> Any:
    """A bound logger tagged with the component name."""
    return structlog.get_logger().bind(component=component)

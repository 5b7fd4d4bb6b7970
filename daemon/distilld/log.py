"""Structured JSON logging with structlog: one line per event on stdout.

This module owns the process-global logging configuration (structlog keeps it
globally); nothing else configures logging. Alert events carry ``alert: true``
so an operator can filter the alert log with one expression (``jq 'select(.alert)'``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.ERROR)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
    # kafka-python logs through the standard library; keep only its warnings,
    # on stderr, so stdout stays one JSON event per line.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(component: str) -> Any:
    """A bound logger tagged with the component name."""
    return structlog.get_logger().bind(component=component)


def alert(logger: Any, event: str, *, severity: str = "warning", **fields: Any) -> None:
    """Log an alert event: marked ``alert: true`` and with a severity."""
    logger.warning(event, alert=True, severity=severity, **fields)

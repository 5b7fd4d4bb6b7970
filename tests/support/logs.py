"""Reading log events in tests.

In-process: the ``logs`` fixture (or :func:`captured_logs` for another level)
captures the events with structlog's own testing helper,
:func:`structlog.testing.capture_logs`, after the project's processors (level,
timestamp, the bound on field length) and in place of the JSON renderer. A test
reads event dicts, not stdout. The capture configures logging first, and a
component binds its logger (``get_logger``) when it is built: what a test builds
after the capture started is seen; a logger bound before it (a component built by
a fixture listed before ``logs``) keeps the previous configuration and is not.
:func:`distilld.log.configure_logging` does not cache loggers
(``cache_logger_on_first_use=False``), so unbound ones follow the capture too.
Code under test that calls ``configure_logging`` itself would end the capture.

From a subprocess: a real ``distilld run`` writes JSON lines to a file, which
:func:`json_lines` reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from structlog.testing import capture_logs

from distilld.log import configure_logging

Event = dict[str, Any]


@contextmanager
def captured_logs(level: str = "INFO") -> Iterator[list[Event]]:
    """The events logged at ``level`` or above while the block runs, as dicts in order;
    the previous logging configuration is back after."""
    saved = structlog.get_config()
    configure_logging(level, "json")
    before_rendering = structlog.get_config()["processors"][:-1]
    try:
        with capture_logs(processors=before_rendering) as entries:
            # The project's processors end in one that returns a plain dict.
            yield cast(list[Event], entries)
    finally:
        structlog.reset_defaults()
        structlog.configure(**saved)


@pytest.fixture
def logs() -> Iterator[list[Event]]:
    """The INFO-and-above events this test logs."""
    with captured_logs("INFO") as entries:
        yield entries


@pytest.fixture
def debug_logs() -> Iterator[list[Event]]:
    """The DEBUG-and-above events this test logs (per-request logs, for example)."""
    with captured_logs("DEBUG") as entries:
        yield entries


def rendered(entries: list[Event]) -> str:
    """The events as the JSON renderer writes them, one line each: for a test about
    what a log line may contain (no secret, a bounded length)."""
    return "\n".join(json.dumps(e, default=repr) for e in entries)


def named(entries: list[Event], event: str) -> list[Event]:
    """The entries of one event name."""
    return [e for e in entries if e["event"] == event]


def alerts(entries: list[Event]) -> list[Event]:
    """The alert events (marked ``alert: true``)."""
    return [e for e in entries if e.get("alert")]


def json_lines(path: Path, skip: int = 0, stop: int | None = None) -> list[Event]:
    """The JSON events of a log file written by a daemon process, in its lines from
    ``skip`` up to ``stop`` (none if the file does not exist yet). Lines that are not JSON
    objects (a library writing to the same stream, a marker the test wrote, a line
    still being written) are skipped."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text(errors="replace").splitlines()[skip:stop]:
        if line[:1] != "{":
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events

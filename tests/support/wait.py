"""Waiting on a condition with a deadline, the one way tests wait.

A test that needs something to have happened (a thread to have polled, a file
to contain a line, a metric to have moved) polls for it with :func:`wait_until`
instead of sleeping a fixed time: it goes on as soon as the condition holds,
and when it never does it fails with a message that says what was awaited and
what was last seen, rather than with a later assertion on a stale state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "the condition",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value,
    and return that value; fail the test after ``timeout`` seconds.

    ``message`` names what is awaited; give a callable to describe the state last
    seen (it is called only on failure).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            said = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g} s waiting for {said}")
        time.sleep(interval)

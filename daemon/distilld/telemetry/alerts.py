"""The one alert path: every alert of the daemon is logged and counted here.

:func:`alert` writes one structlog JSON line marked ``alert: true`` with a
severity (so an operator filters the alert log with ``jq 'select(.alert)'``)
and counts it in :data:`ALERTS`, which every daemon's metrics registry exposes
as ``distilld_alerts_total{event,severity}``. The tally is per process (one
daemon per process in production; tests compare before and after).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

__all__ = ["ALERTS", "AlertTally", "alert"]


class AlertTally:
    """Alerts emitted in this process, by (event, severity). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, event: str, severity: str) -> None:
        with self._lock:
            self._counts[(event, severity)] += 1

    def counts(self) -> dict[tuple[str, str], int]:
        """A copy of the counts."""
        with self._lock:
            return dict(self._counts)


ALERTS = AlertTally()


def alert(logger: Any, event: str, *, severity: str = "warning", **fields: Any) -> None:
    """Log an alert event (``alert: true``, with a severity) and count it."""
    logger.warning(event, alert=True, severity=severity, **fields)
    ALERTS.add(event, severity)

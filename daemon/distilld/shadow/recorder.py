"""The shadow worker's writes to the sample store, with their failure latch.

Every write of the worker (reservoir rows, comparisons, teacher alerts) goes
through :class:`ShadowRecorder`. A write that fails is counted
(``store_errors``) and dropped: serving and sampling go on. One
``shadow.store_failed`` alert marks the start of a failing spell and one
``shadow.store_ok_again`` log line its end (the first write accepted after it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from distilld.shadow.stats import ShadowStats
from distilld.store.base import AlertEvent, SampleStore, StoredComparison, TrafficSample
from distilld.telemetry.alerts import alert
from distilld.telemetry.latch import Latch

# The latch's one key: the store is either accepting writes or not.
_STORE = "store"


class ShadowRecorder:
    """Writes to ``store`` that never raise: each returns whether the store took it."""

    def __init__(self, store: SampleStore, stats: ShadowStats, log: Any) -> None:
        self._store = store
        self._stats = stats
        self._log = log
        self._failing: Latch[str, bool] = Latch()

    def add_traffic(self, rows: Sequence[TrafficSample]) -> bool:
        """Reservoir rows."""
        return self._write("add_traffic", lambda: self._store.add_traffic(rows))

    def add_comparisons(self, records: Sequence[StoredComparison]) -> bool:
        """Scored comparisons."""
        return self._write("add_comparisons", lambda: self._store.add_comparisons(records))

    def add_alert(self, event: AlertEvent) -> bool:
        """An alert, stored so that ``distilld status`` lists it among the last alerts."""
        return self._write("add_alert", lambda: self._store.add_alert(event))

    def _write(self, operation: str, write: Callable[[], object]) -> bool:
        """One store write; a failure is counted and alerted once per failing spell."""
        try:
            write()
        except Exception as exc:
            self._stats.add("store_errors")
            if self._failing.set(_STORE, True):
                alert(
                    self._log,
                    "shadow.store_failed",
                    severity="error",
                    operation=operation,
                    error=f"{type(exc).__name__}: {exc}",
                    action="reservoir rows and comparisons are lost until the store accepts "
                    "writes again; serving is unaffected",
                )
            return False
        if self._failing.clear(_STORE) is not None:
            self._log.info("shadow.store_ok_again", operation=operation)
        return True

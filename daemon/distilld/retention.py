"""Retention: what the daemon deletes so that its disk use stays bounded.

Three kinds of things grow with every check and every sampled request:

* the check report folders (``REPORTS_DIR/TASK/TIME/``, an Evidently HTML page
  of a few MB each): the newest ``reports_per_task`` of each task are kept
  (:func:`prune_reports`), and as many failed-gate reports of each task
  (``WORK_DIR/TASK/failed-gates/``, :func:`prune_failed_gates`);
* the comparisons (they hold the input texts), alerts and check summaries in
  the sample store: rows older than the cutoff go, except each task's newest
  rows that the monitors still read (:func:`rows_cutoff`, :func:`rows_floor`,
  :meth:`~distilld.store.base.SampleStore.prune`);
* the logs of the child processes, rotated by size as they are written
  (:mod:`distilld.logfiles`, not here).

:class:`Retention` runs one sweep of the first two; the daemon runs it when it
starts and then every ``interval_s`` on the monitor scheduler. A sweep never
raises: what fails is logged and retried at the next sweep.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distilld.alerts import DEFAULT_RESTORE_LIMIT
from distilld.log import get_logger
from distilld.monitoring.measure import REPORT_DIR_NAME
from distilld.policy.model import Policy
from distilld.retrain.gate_report import FAILED_GATES_DIR
from distilld.store.base import SampleStore

DAY_S = 86_400.0
#: A failed-gate report (``gate-TIME.json``, with its ``.html`` beside it).
FAILED_GATE_NAME = re.compile(r"gate-\d{8}T\d{6}\.(json|html)")


@dataclass(frozen=True)
class RetentionConfig:
    """How much the daemon keeps (from the ``DISTILLD_RETENTION_*`` settings)."""

    max_age_s: float = 30 * DAY_S
    reports_per_task: int = 50
    interval_s: float = 3600.0

    def __post_init__(self) -> None:
        if not (self.max_age_s > 0 and self.reports_per_task >= 1 and self.interval_s > 0):
            raise ValueError(
                "retention needs max_age_s > 0, reports_per_task >= 1 and interval_s > 0 "
                f"(received {self.max_age_s}, {self.reports_per_task}, {self.interval_s})"
            )


def oldest_beyond(names: Iterable[str], keep: int) -> list[str]:
    """The names to delete so that the newest ``keep`` remain, oldest first (names sort
    in time order)."""
    ordered = sorted(names)
    return ordered[: max(0, len(ordered) - keep)]


def prune_reports(reports_dir: Path, keep: int) -> list[Path]:
    """Delete each task's check report folders beyond its newest ``keep``; returns the
    folders deleted. Only folders named like a check's (``REPORT_DIR_NAME``) count."""
    deleted: list[Path] = []
    if not reports_dir.is_dir():
        return deleted
    for task_dir in sorted(p for p in reports_dir.iterdir() if p.is_dir()):
        names = [p.name for p in task_dir.iterdir() if p.is_dir() and _is_report(p.name)]
        for name in oldest_beyond(names, keep):
            path = task_dir / name
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                deleted.append(path)
    return deleted


def prune_failed_gates(work_dir: Path, keep: int) -> list[Path]:
    """Delete each task's failed-gate reports beyond its newest ``keep`` (a report is its
    ``.json`` and ``.html``); returns the files deleted."""
    deleted: list[Path] = []
    if not work_dir.is_dir():
        return deleted
    for task_dir in sorted(p for p in work_dir.iterdir() if p.is_dir()):
        gates = task_dir / FAILED_GATES_DIR
        if not gates.is_dir():
            continue
        files = [p for p in gates.iterdir() if FAILED_GATE_NAME.fullmatch(p.name)]
        stems = {p.name.rsplit(".", 1)[0] for p in files}
        old = set(oldest_beyond(stems, keep))
        for path in sorted(files):
            if path.name.rsplit(".", 1)[0] in old:
                path.unlink(missing_ok=True)
                deleted.append(path)
    return deleted


def rows_cutoff(now: float, max_age_s: float, policies: Iterable[Policy]) -> float:
    """Rows created before this are old enough to delete: ``max_age_s`` ago, or earlier
    when a policy's shadow run or rollback watch lasts longer (they read comparisons
    since the candidate started shadowing / since the promotion)."""
    longest = max_age_s
    for policy in policies:
        retraining = policy.retraining
        if retraining is not None and retraining.enabled:
            longest = max(
                longest, retraining.shadow.max_duration_s, retraining.rollback.watch_window_s
            )
    return now - longest


def rows_floor(policies: Iterable[Policy]) -> int:
    """Rows kept per task and table whatever their age: the accuracy window (the monitor
    and the shadow sampler read the task's last ``accuracy.window`` comparisons) and the
    alerts replayed at a start to restore open breaches."""
    return max([DEFAULT_RESTORE_LIMIT, *(p.monitors.accuracy.window for p in policies)])


@dataclass
class Retention:
    """One sweep over the reports, failed-gate reports and store rows (see the module)."""

    config: RetentionConfig
    store: SampleStore
    reports_dir: Path
    work_dir: Path
    policies: list[Policy]
    clock: Callable[[], float] = time.time
    _log: Any = field(default_factory=lambda: get_logger("retention"), init=False, repr=False)

    def run(self) -> dict[str, int]:
        """Apply retention now; returns what each kind lost (folders, files, rows)."""
        outcome: dict[str, int] = {}
        started = time.monotonic()
        keep = self.config.reports_per_task
        try:
            outcome["report_dirs"] = len(prune_reports(self.reports_dir, keep))
            outcome["failed_gate_files"] = len(prune_failed_gates(self.work_dir, keep))
        except OSError as exc:
            self._failed("reports", exc)
        try:
            rows = self.store.prune(
                rows_cutoff(self.clock(), self.config.max_age_s, self.policies),
                rows_floor(self.policies),
            )
            outcome.update({f"{table}_rows": count for table, count in rows.items()})
        except Exception as exc:  # the store's StoreError, or a database it cannot read
            self._failed("store", exc)
        self._log.info(
            "retention.swept",
            deleted=outcome,
            elapsed_s=round(time.monotonic() - started, 3),
        )
        return outcome

    def _failed(self, what: str, exc: Exception) -> None:
        self._log.error(
            "retention.failed",
            what=what,
            error=f"{type(exc).__name__}: {exc}",
            action=f"retried at the next sweep (every {self.config.interval_s:g} s); until "
            "then disk use grows",
        )


def _is_report(name: str) -> bool:
    return REPORT_DIR_NAME.fullmatch(name) is not None

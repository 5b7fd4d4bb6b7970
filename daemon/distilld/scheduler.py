"""Runs each task's monitoring check on its policy's interval (APScheduler 3 wiring only).

A :class:`MonitorScheduler` holds one interval job per task on a
``BackgroundScheduler``. What a check does is the job's ``check`` callable
(built by the app: :func:`distilld.monitoring.measure.run_check`, then the
alert sink); this module only decides when it runs and what happens when it
fails:

* ``max_instances=1``: a check that takes longer than its interval is not
  started a second time beside itself;
* ``coalesce=True`` and no misfire grace limit: runs missed while the process
  was busy (or the host asleep) collapse into one late run instead of a burst
  or none;
* one worker thread by default: Evidently is CPU-heavy, and checks of several
  tasks queue up rather than compete with serving for the cores;
* a failing check logs one ``monitor.check_failed`` alert per failure and the
  job stays scheduled: the next interval runs it again.

:meth:`MonitorScheduler.run_now` runs a task's check at once on the calling
thread (``distilld check``); a per-task lock keeps it from overlapping with
that task's scheduled run. :meth:`MonitorScheduler.every` adds housekeeping
jobs (the retention sweep) on the same worker thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from apscheduler.executors.pool import (  # type: ignore[import-untyped]
    ThreadPoolExecutor,
)
from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
    BackgroundScheduler,
)

from distilld.log import get_logger
from distilld.telemetry.alerts import alert


@dataclass(frozen=True)
class MonitorJob:
    """One task's check and how often it runs (the policy's ``monitors.interval_s``)."""

    task: str
    interval_s: float
    check: Callable[[], object]

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(
                f"task {self.task!r}: interval_s must be positive (received {self.interval_s})"
            )


@dataclass
class _JobStats:
    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_run_at: float | None = None
    last_error: str | None = None


class MonitorScheduler:
    """Interval checks per task in a background thread, plus checks on demand."""

    def __init__(self, jobs: Sequence[MonitorJob], *, max_concurrent_checks: int = 1) -> None:
        names = [j.task for j in jobs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"each task needs exactly one monitor job (repeated: {repeated})")
        if max_concurrent_checks < 1:
            raise ValueError(
                f"max_concurrent_checks must be at least 1 (received {max_concurrent_checks})"
            )
        self._jobs = {j.task: j for j in jobs}
        self._locks = {j.task: threading.Lock() for j in jobs}
        self._stats = {j.task: _JobStats() for j in jobs}
        self._stats_lock = threading.Lock()
        self._log = get_logger("scheduler")
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=max_concurrent_checks)},
            timezone=UTC,
        )
        for job in jobs:
            self._scheduler.add_job(
                self._run_scheduled,
                "interval",
                seconds=job.interval_s,
                args=[job.task],
                id=f"monitor:{job.task}",
                name=f"monitor check of {job.task}",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
            )

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def start(self) -> None:
        """Start the background thread; each task's first check comes one interval later."""
        self._scheduler.start()
        self._log.info(
            "scheduler.started",
            jobs={task: job.interval_s for task, job in sorted(self._jobs.items())},
        )

    def stop(self, wait: bool = True) -> None:
        """Stop scheduling; with ``wait``, let a check in progress finish first."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)
            self._log.info("scheduler.stopped")

    def every(self, name: str, interval_s: float, run: Callable[[], object]) -> None:
        """Also run ``run`` every ``interval_s`` seconds (housekeeping such as retention),
        on the checks' worker thread; a failure is logged and the job stays scheduled."""
        if not interval_s > 0:
            raise ValueError(f"job {name!r}: interval_s must be positive (received {interval_s})")
        self._scheduler.add_job(
            self._run_housekeeping,
            "interval",
            seconds=interval_s,
            args=[name, run],
            id=f"housekeeping:{name}",
            name=name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )

    def run_now(self, task: str) -> object:
        """Run ``task``'s check now on this thread and return its result.

        A failure is logged as ``monitor.check_failed`` like a scheduled one,
        then raised: the caller (``distilld check``) must know it failed.
        """
        if task not in self._jobs:
            raise KeyError(f"no monitor job for task {task!r} (known: {sorted(self._jobs)})")
        return self._run(task, trigger="on_demand", reraise=True)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Runs, failures and the last error per task."""
        with self._stats_lock:
            return {task: dict(vars(s)) for task, s in self._stats.items()}

    # -- internals ----------------------------------------------------------------

    def _run_scheduled(self, task: str) -> None:
        # APScheduler would only log an exception through the standard logging
        # module; catching it here turns it into an alert line instead.
        self._run(task, trigger="interval", reraise=False)

    def _run_housekeeping(self, name: str, run: Callable[[], object]) -> None:
        try:
            run()
        except Exception as exc:
            self._log.error(
                "scheduler.job_failed",
                job=name,
                error=f"{type(exc).__name__}: {exc}",
                action="the job runs again at its next interval",
            )

    def _run(self, task: str, *, trigger: str, reraise: bool) -> object:
        job = self._jobs[task]
        with self._locks[task]:
            started = time.monotonic()
            try:
                result = job.check()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                with self._stats_lock:
                    stats = self._stats[task]
                    stats.runs += 1
                    stats.failures += 1
                    stats.consecutive_failures += 1
                    stats.last_run_at = time.time()
                    stats.last_error = error
                    consecutive = stats.consecutive_failures
                alert(
                    self._log,
                    "monitor.check_failed",
                    severity="error",
                    task=task,
                    trigger=trigger,
                    error=error,
                    consecutive_failures=consecutive,
                    action="the check runs again at the next interval; fix the cause if it "
                    "keeps failing (monitoring is blind meanwhile)",
                )
                if reraise:
                    raise
                return None
        with self._stats_lock:
            stats = self._stats[task]
            stats.runs += 1
            stats.consecutive_failures = 0
            stats.last_run_at = time.time()
        self._log.info(
            "monitor.check_done",
            task=task,
            trigger=trigger,
            elapsed_s=round(time.monotonic() - started, 3),
        )
        return result

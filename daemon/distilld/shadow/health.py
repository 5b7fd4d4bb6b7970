"""Whether each task's teacher can be asked now: outages, pauses and answer quality.

A teacher that cannot answer (breaker open, budget spent, timeouts, any batch
error) pauses its task's comparisons until the error's ``retry_after_s`` (at
least ``min_retry_s``; ``error_retry_s`` for errors that give no hint, see
:func:`retry_wait`): sampled requests are dropped and counted (``paused``)
meanwhile. One ``teacher.unavailable`` alert marks the start of an outage and
one ``teacher.available_again`` its end (the first batch answered after it).

Answers the teacher gave for one input but that are unusable (a label outside
the set, JSON failing the schema) say nothing about the student. A batch where
at least :data:`BAD_ANSWER_SHARE` of the answers are unusable raises one
``teacher.bad_answers`` alert until a later batch is mostly usable again
(``teacher.answers_ok_again``).

Every alert here is also stored (through the recorder) so that
``distilld status`` lists teacher outages among the last alerts.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distilld.shadow.recorder import ShadowRecorder
from distilld.shadow.stats import ShadowStats
from distilld.store.base import AlertEvent
from distilld.telemetry.alerts import alert
from distilld.telemetry.latch import Latch

Clock = Callable[[], float]

# A batch with at least this share of unusable answers means the teacher, not one
# odd input, is at fault: worth an alert.
BAD_ANSWER_SHARE = 0.5


def retry_wait(retry_after_s: float | None, *, min_retry_s: float, error_retry_s: float) -> float:
    """Seconds to pause a task after its teacher failed: the error's hint
    (``retry_after_s``; None or not finite: no hint, then ``error_retry_s``), at
    least ``min_retry_s``."""
    if retry_after_s is None or not math.isfinite(retry_after_s):
        return max(min_retry_s, error_retry_s)
    return max(min_retry_s, retry_after_s)


def mostly_unusable(unusable: int, total: int) -> bool:
    """Whether a batch with ``unusable`` of ``total`` answers unusable points at the
    teacher (at least :data:`BAD_ANSWER_SHARE`), not at one odd input."""
    return total > 0 and unusable / total >= BAD_ANSWER_SHARE


@dataclass
class _Outage:
    since: float  # clock time
    failures: int = 1


class TeacherHealth:
    """The availability and answer quality of each task's teacher, alerted once per spell.

    Called from the worker's intake thread (:meth:`is_paused`) and labeller thread
    (the rest); thread-safe.
    """

    def __init__(
        self,
        recorder: ShadowRecorder,
        stats: ShadowStats,
        log: Any,
        *,
        min_retry_s: float,
        error_retry_s: float,
        clock: Clock,
    ) -> None:
        self._recorder = recorder
        self._stats = stats
        self._log = log
        self._min_retry_s = min_retry_s
        self._error_retry_s = error_retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._retry_at: dict[str, float] = {}
        # Alert once per spell (breach and recovery edges): a task's teacher outage,
        # a task's teacher giving unusable answers.
        self._outages: Latch[str, _Outage] = Latch()
        self._bad_answers: Latch[str, bool] = Latch()

    def is_paused(self, task: str) -> bool:
        """Whether the task's comparisons wait for its teacher to be asked again."""
        with self._lock:
            return self._clock() < self._retry_at.get(task, -math.inf)

    def paused_tasks(self) -> dict[str, float]:
        """Tasks whose comparisons are paused, with the seconds until the next try."""
        now = self._clock()
        with self._lock:
            return {
                task: max(0.0, at - now)
                for task, at in self._retry_at.items()
                if task in self._outages
            }

    def failed(self, task: str, exc: Exception, retry_after_s: float | None, lost: int) -> None:
        """The task's teacher could not answer a batch of ``lost`` inputs: pause the
        task (``retry_after_s`` None: the error gave no hint) and alert if this
        starts an outage."""
        wait = retry_wait(
            retry_after_s,
            min_retry_s=self._min_retry_s,
            error_retry_s=self._error_retry_s,
        )
        now = self._clock()
        with self._lock:
            self._retry_at[task] = now + wait
            started = self._outages.set(task, _Outage(since=now))
            outage = self._outages.get(task)
            if not started and outage is not None:
                outage.failures += 1
        self._stats.add("paused", lost)
        error = f"{type(exc).__name__}: {exc}"
        if not started:
            self._log.info("teacher.still_unavailable", task=task, error=error, retry_in_s=wait)
            return
        alert(
            self._log,
            "teacher.unavailable",
            severity="warning",
            task=task,
            error=error,
            retry_in_s=round(wait, 3),
            action="comparisons of this task are paused and sampled requests dropped until "
            "the teacher answers again; serving and the traffic reservoir are unaffected",
        )
        self._store_alert(task, "teacher_unavailable", {"error": error, "retry_in_s": wait})

    def answered(self, task: str) -> None:
        """The task's teacher answered a batch: end its outage, if any."""
        with self._lock:
            self._retry_at.pop(task, None)
            outage = self._outages.clear(task)
        if outage is None:
            return
        outage_s = round(self._clock() - outage.since, 3)
        alert(
            self._log,
            "teacher.available_again",
            severity="info",
            task=task,
            failed_calls=outage.failures,
            outage_s=outage_s,
            action="comparisons resumed",
        )
        self._store_alert(
            task, "teacher_available", {"failed_calls": outage.failures, "outage_s": outage_s}
        )

    def answer_quality(self, task: str, unusable: int, total: int) -> None:
        """``unusable`` of the ``total`` answers of one batch were unusable: alert when
        that starts or ends a spell of mostly unusable batches."""
        bad = mostly_unusable(unusable, total)
        if bad:
            edge = self._bad_answers.set(task, True)
        else:
            edge = self._bad_answers.clear(task) is not None
        if bad and edge:
            alert(
                self._log,
                "teacher.bad_answers",
                severity="warning",
                task=task,
                unusable=unusable,
                batch=total,
                action="unusable teacher answers are not compared; check the teacher's prompt, "
                "label set or schema",
            )
            self._store_alert(task, "teacher_bad_answers", {"unusable": unusable, "batch": total})
        elif edge:
            alert(
                self._log,
                "teacher.answers_ok_again",
                severity="info",
                task=task,
                unusable=unusable,
                batch=total,
            )
            self._store_alert(task, "teacher_answers_ok", {"unusable": unusable, "batch": total})

    def _store_alert(self, task: str, kind: str, payload: dict[str, Any]) -> None:
        self._recorder.add_alert(
            AlertEvent(task=task, kind=kind, metric="teacher", payload=payload)
        )

"""The sample store contract: what the daemon remembers between checks and restarts.

Four kinds of records, each kept per task:

* comparisons: a sampled request answered by both the student and the
  teacher, with the comparison's score (the accuracy monitor reads the last N);
* the traffic reservoir: recent inputs with the student's answer, bounded per
  task, kept to regenerate training data later;
* alert events: what the policy evaluation decided to report;
* check results: the JSON summary of each monitoring check.

Comparisons, alerts and checks are deleted by age (:meth:`SampleStore.prune`,
run by the daemon's retention sweep), the reservoir by count.

Records are plain frozen dataclasses so that stores stay interchangeable
(SQLite by default, Postgres when several replicas share state). Every query
returns records oldest first, so a window reads in the order things happened.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# StoreError is defined in distilld.errors and re-exported here.
from distilld.errors import StoreError as StoreError

Output = str | dict[str, Any]
# Recent comparisons read at once to judge a version (a shadow run, the watch after a
# promotion) or to draw its report: enough for any window, bounded in memory.
COMPARISONS_READ = 50_000


@dataclass(frozen=True)
class StoredComparison:
    """A sampled request answered by the student and by the teacher.

    ``segment`` maps segment keys to values (e.g. ``{"length": "<64", "source":
    "app"}``). ``score`` is the comparison's value in [0, 1]: agreement (1 or 0)
    for classification, field F1 for extraction. ``schema_valid`` says whether
    the student's output passed validation (label in the set, JSON matching
    the schema). Teacher fields are None when the teacher gave no usable
    answer for this input. ``created_at`` is Unix time in seconds.
    """

    task: str
    request_id: str
    segment: dict[str, str]
    input_text: str
    student_output: Output
    student_confidence: float
    model_version: str
    teacher_output: Output | None
    teacher_confidence: float | None
    teacher_probabilities: dict[str, float] | None
    score: float | None
    schema_valid: bool
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class TrafficSample:
    """One recent request of a task, for the reservoir."""

    task: str
    input_text: str
    metadata: dict[str, Any]
    student_output: Output
    student_confidence: float
    request_id: str | None = None
    model_version: str | None = None
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class AlertEvent:
    """A decision the policy evaluation reported (a breach, a recovery, an outage)."""

    task: str
    kind: str  # e.g. "breach", "recovery", "teacher_unavailable"
    metric: str  # e.g. "accuracy", "drift_share"
    segment: dict[str, str] | None = None  # None: the whole task
    value: float | None = None
    threshold: float | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class CheckResult:
    """The JSON summary of one monitoring check of a task."""

    task: str
    summary: dict[str, Any]
    created_at: float = field(default_factory=time.time)


@runtime_checkable
class SampleStore(Protocol):
    """Durable storage for comparisons, the traffic reservoir, alerts and checks.

    Implementations are safe to use from several threads at once (the shadow
    worker writes while the scheduler's checks read).
    """

    def add_comparisons(self, records: Sequence[StoredComparison]) -> None: ...

    def last_comparisons(self, task: str, limit: int) -> list[StoredComparison]:
        """The ``limit`` most recent comparisons of ``task``, oldest first."""
        ...

    def count_comparisons(self, task: str, since: float | None = None) -> int:
        """How many comparisons ``task`` has (created at or after ``since``)."""
        ...

    def add_traffic(self, samples: Sequence[TrafficSample]) -> None:
        """Add to each task's reservoir, dropping its oldest samples beyond the bound."""
        ...

    def reservoir(self, task: str, limit: int | None = None) -> list[TrafficSample]:
        """The reservoir of ``task`` (its ``limit`` most recent samples), oldest first."""
        ...

    def add_alert(self, event: AlertEvent) -> None: ...

    def last_alerts(self, task: str | None = None, limit: int = 20) -> list[AlertEvent]:
        """The ``limit`` most recent alerts (of ``task``, or of every task), oldest first."""
        ...

    def add_check(self, result: CheckResult) -> None: ...

    def last_check(self, task: str) -> CheckResult | None:
        """The most recent check of ``task``, or None if it was never checked."""
        ...

    def checks(self, task: str, limit: int = 500) -> list[CheckResult]:
        """The last ``limit`` checks of ``task``, oldest first."""
        ...

    def prune(self, older_than: float, keep_per_task: int) -> dict[str, int]:
        """Delete the comparisons, alerts and checks created before ``older_than`` (Unix
        time in seconds), except each task's newest ``keep_per_task`` rows of each of
        these tables; returns how many rows each table lost. The traffic reservoir is
        bounded by count when samples are added, not here."""
        ...

    def close(self) -> None: ...

"""A check's measurements judged against the policy's monitors: measurements in,
verdicts out; verdicts in, alert events out.

Two pure functions, no I/O and no logging (the caller logs the events):

- :func:`evaluate` turns one check's accuracy and drift measurements into
  verdicts, one per (task, metric, segment): ok, breach, or
  insufficient_data (too few samples to say anything);
- :func:`transition` turns the previous alert state and new verdicts into
  the next state and the events to emit. A breach emits one "breach" event
  when it starts, nothing while it lasts, and one "recovered" event when a
  later verdict is ok again. Insufficient data changes nothing: an open
  breach is not declared over without evidence, and no breach is opened
  without evidence either.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from distilld.monitoring.accuracy import AccuracyMeasurement, AccuracyStat
from distilld.monitoring.config import AccuracyMonitorConfig, DriftMonitorConfig, MonitorsConfig
from distilld.monitoring.drift import DriftMeasurement
from distilld.monitoring.features import MonitoringError
from distilld.vocabulary import OVERALL

DRIFT_METRIC = "drift_share"


class Status(StrEnum):
    ok = "ok"
    breach = "breach"
    insufficient_data = "insufficient_data"


class EventKind(StrEnum):
    breach = "breach"
    recovered = "recovered"


class Severity(StrEnum):
    critical = "critical"  # the student fails the task overall
    warning = "warning"  # one segment fails, or inputs drifted
    info = "info"  # a breach is over


@dataclass(frozen=True, order=True)
class AlertKey:
    """What an alert is about; one open breach at most per key."""

    task: str
    metric: str
    segment: str


@dataclass(frozen=True)
class Verdict:
    """One metric of one segment of one task, judged against the policy.

    ``value`` is the measured value (mean score, or drift share), None when
    nothing was measured. ``window`` is the configured window size and
    ``samples`` how many observations it actually held. ``interval`` is the
    confidence interval of accuracy values (None for drift).
    """

    task: str
    metric: str
    segment: str
    status: Status
    value: float | None
    threshold: float
    window: int
    samples: int
    interval: tuple[float, float] | None = None

    @property
    def key(self) -> AlertKey:
        return AlertKey(self.task, self.metric, self.segment)


@dataclass(frozen=True)
class AlertEvent:
    """One line for the alert log: a breach started, or ended."""

    kind: EventKind
    severity: Severity
    task: str
    metric: str
    segment: str
    value: float | None
    threshold: float
    window: int
    samples: int
    interval: tuple[float, float] | None


@dataclass(frozen=True)
class AlertState:
    """The keys whose breach is open. Persist it to survive restarts."""

    breached: frozenset[AlertKey] = frozenset()


# --------------------------------------------------------------------------- verdicts


def _accuracy_verdict(
    task: str, metric: str, stat: AccuracyStat, config: AccuracyMonitorConfig
) -> Verdict:
    if not stat.sufficient or stat.value is None:
        status = Status.insufficient_data
    else:
        # upper_bound: breach only when even the optimistic end of the interval
        # is below the bar, so sampling noise alone rarely raises an alert.
        judged = stat.high if config.breach_when == "upper_bound" else stat.value
        status = Status.breach if judged < config.threshold else Status.ok
    return Verdict(
        task=task,
        metric=metric,
        segment=stat.segment,
        status=status,
        value=stat.value,
        threshold=config.threshold,
        window=config.window,
        samples=stat.samples,
        interval=(stat.low, stat.high) if stat.samples else None,
    )


def accuracy_verdicts(
    measurement: AccuracyMeasurement, config: AccuracyMonitorConfig
) -> list[Verdict]:
    """The overall verdict first, then one per segment."""
    stats = [measurement.overall, *measurement.segments]
    return [_accuracy_verdict(measurement.task, measurement.metric, s, config) for s in stats]


def drift_verdict(
    task: str, measurement: DriftMeasurement | None, config: DriftMonitorConfig
) -> Verdict:
    """Breach when the share of drifted features reaches the policy's drift_share.

    ``measurement`` None means drift was not measured this time (too little
    traffic to be worth an Evidently run): insufficient data.
    """
    if measurement is None:
        value, samples, status = None, 0, Status.insufficient_data
    else:
        value, samples = measurement.drift_share, measurement.current_rows
        if samples < config.min_samples:
            status = Status.insufficient_data
        elif value >= config.drift_share:
            status = Status.breach
        else:
            status = Status.ok
    return Verdict(
        task=task,
        metric=DRIFT_METRIC,
        segment=OVERALL,
        status=status,
        value=value,
        threshold=config.drift_share,
        window=config.window,
        samples=samples,
    )


def evaluate(
    task: str,
    monitors: MonitorsConfig,
    *,
    accuracy: AccuracyMeasurement | None,
    drift: DriftMeasurement | None,
) -> list[Verdict]:
    """All verdicts of one check of ``task``; a disabled monitor gives none."""
    verdicts: list[Verdict] = []
    if monitors.accuracy.enabled:
        if accuracy is None:
            raise MonitoringError(
                f"task {task!r}: the accuracy monitor is enabled but no accuracy measurement "
                "was given; measure it (monitoring.accuracy.measure_accuracy) or disable it in "
                "the policy (monitors.accuracy.enabled: false)"
            )
        if accuracy.task != task:
            raise MonitoringError(
                f"evaluating task {task!r} with an accuracy measurement of task {accuracy.task!r}"
            )
        verdicts.extend(accuracy_verdicts(accuracy, monitors.accuracy))
    if monitors.drift.enabled:
        verdicts.append(drift_verdict(task, drift, monitors.drift))
    return verdicts


# --------------------------------------------------------------------------- alerts


def _severity(verdict: Verdict) -> Severity:
    if verdict.metric != DRIFT_METRIC and verdict.segment == OVERALL:
        return Severity.critical
    return Severity.warning


def _event(kind: EventKind, severity: Severity, verdict: Verdict) -> AlertEvent:
    return AlertEvent(
        kind=kind,
        severity=severity,
        task=verdict.task,
        metric=verdict.metric,
        segment=verdict.segment,
        value=verdict.value,
        threshold=verdict.threshold,
        window=verdict.window,
        samples=verdict.samples,
        interval=verdict.interval,
    )


def transition(
    state: AlertState, verdicts: Iterable[Verdict]
) -> tuple[AlertState, list[AlertEvent]]:
    """The next alert state and the events to emit, in verdict order.

    A key that gets no verdict this time (a segment without traffic, a
    disabled monitor) keeps its state.
    """
    breached = set(state.breached)
    events: list[AlertEvent] = []
    seen: set[AlertKey] = set()
    for verdict in verdicts:
        key = verdict.key
        if key in seen:
            raise MonitoringError(
                f"two verdicts for the same task, metric and segment {key}; evaluate each "
                "check's measurements once"
            )
        seen.add(key)
        if verdict.status is Status.breach and key not in breached:
            breached.add(key)
            events.append(_event(EventKind.breach, _severity(verdict), verdict))
        elif verdict.status is Status.ok and key in breached:
            breached.discard(key)
            events.append(_event(EventKind.recovered, Severity.info, verdict))
    return AlertState(frozenset(breached)), events

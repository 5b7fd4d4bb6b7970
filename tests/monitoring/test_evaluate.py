"""Policy evaluation: verdicts from measurements, and one alert per breach.

Measurements are built by hand here (no Evidently): evaluation is pure and
only reads their numbers.
"""

from __future__ import annotations

import pytest

from distilld.monitoring.accuracy import (
    OVERALL,
    AccuracyMeasurement,
    AccuracyStat,
    wilson_interval,
)
from distilld.monitoring.config import (
    AccuracyMonitorConfig,
    DriftMonitorConfig,
    MonitorsConfig,
    SegmentAccuracyConfig,
)
from distilld.monitoring.drift import DriftMeasurement
from distilld.monitoring.evaluate import (
    DRIFT_METRIC,
    AlertKey,
    AlertState,
    EventKind,
    Severity,
    Status,
    Verdict,
    accuracy_verdicts,
    drift_verdict,
    evaluate,
    transition,
)
from distilld.monitoring.features import MonitoringError

ACCURACY = AccuracyMonitorConfig(
    window=1000,
    min_samples=100,
    threshold=0.9,
    segments=SegmentAccuracyConfig(min_samples=50),
)
DRIFT = DriftMonitorConfig(window=500, min_samples=200, drift_share=0.5)


def stat(segment: str, successes: int, n: int, min_samples: int = 100) -> AccuracyStat:
    low, high = wilson_interval(successes, n)
    return AccuracyStat(
        segment=segment,
        samples=n,
        value=successes / n if n else None,
        low=low,
        high=high,
        min_samples=min_samples,
    )


def accuracy(overall: AccuracyStat, *segments: AccuracyStat) -> AccuracyMeasurement:
    return AccuracyMeasurement(
        task="reviews",
        metric="agreement",
        window=1000,
        confidence_level=0.95,
        overall=overall,
        segments=segments,
    )


def drift(share: float, rows: int = 500) -> DriftMeasurement:
    return DriftMeasurement(
        reference_rows=2000,
        current_rows=rows,
        tested_columns=10,
        drifted_columns=round(share * 10),
        drift_share=share,
        share_threshold=0.5,
        dataset_drift=share >= 0.5,
        features=(),
        evidently_version="0.7.23",
        elapsed_s=1.0,
    )


def verdict(status: Status, segment: str = OVERALL, metric: str = "agreement") -> Verdict:
    return Verdict(
        task="reviews",
        metric=metric,
        segment=segment,
        status=status,
        value={Status.breach: 0.8, Status.ok: 0.95}.get(status),
        threshold=0.9,
        window=1000,
        samples=500,
        interval=(0.75, 0.85) if status is Status.breach else None,
    )


# --------------------------------------------------------------------------- verdicts


def test_accuracy_ok_breach_and_insufficient() -> None:
    ok = accuracy_verdicts(accuracy(stat(OVERALL, 950, 1000)), ACCURACY)[0]
    assert (ok.status, ok.value, ok.threshold, ok.window, ok.samples) == (
        Status.ok,
        0.95,
        0.9,
        1000,
        1000,
    )
    assert ok.interval == pytest.approx(wilson_interval(950, 1000))
    breach = accuracy_verdicts(accuracy(stat(OVERALL, 800, 1000)), ACCURACY)[0]
    assert breach.status is Status.breach
    few = accuracy_verdicts(accuracy(stat(OVERALL, 10, 50)), ACCURACY)[0]
    assert few.status is Status.insufficient_data  # 20 % agreement, but only 50 samples
    none = accuracy_verdicts(accuracy(stat(OVERALL, 0, 0)), ACCURACY)[0]
    assert (none.status, none.value, none.interval) == (Status.insufficient_data, None, None)


def test_upper_bound_rule_waits_for_the_whole_interval_below_the_bar() -> None:
    # 176/200 = 0.88 < 0.9, but the interval reaches above 0.9.
    measured = accuracy(stat(OVERALL, 176, 200))
    assert measured.overall.high > 0.9
    assert accuracy_verdicts(measured, ACCURACY)[0].status is Status.ok
    eager = ACCURACY.model_copy(update={"breach_when": "estimate"})
    assert accuracy_verdicts(measured, eager)[0].status is Status.breach


def test_a_segment_only_failure_is_its_own_breach() -> None:
    measured = accuracy(
        stat(OVERALL, 940, 1000),
        stat("kind=review", 900, 900, min_samples=50),
        stat("kind=plot", 40, 100, min_samples=50),
        stat("kind=rare", 0, 10, min_samples=50),
    )
    verdicts = {v.segment: v.status for v in accuracy_verdicts(measured, ACCURACY)}
    assert verdicts == {
        OVERALL: Status.ok,
        "kind=review": Status.ok,
        "kind=plot": Status.breach,
        "kind=rare": Status.insufficient_data,
    }


def test_drift_verdicts() -> None:
    assert drift_verdict("reviews", drift(0.1), DRIFT).status is Status.ok
    breach = drift_verdict("reviews", drift(0.5), DRIFT)
    assert (breach.status, breach.metric, breach.segment) == (Status.breach, DRIFT_METRIC, OVERALL)
    assert (breach.value, breach.threshold, breach.window, breach.samples) == (0.5, 0.5, 500, 500)
    small = drift_verdict("reviews", drift(1.0, rows=100), DRIFT)
    assert small.status is Status.insufficient_data  # 100 rows < min_samples 200
    missing = drift_verdict("reviews", None, DRIFT)
    assert (missing.status, missing.value, missing.samples) == (Status.insufficient_data, None, 0)


def test_evaluate_combines_enabled_monitors() -> None:
    monitors = MonitorsConfig(accuracy=ACCURACY, drift=DRIFT)
    verdicts = evaluate(
        "reviews", monitors, accuracy=accuracy(stat(OVERALL, 950, 1000)), drift=drift(0.7)
    )
    assert [(v.metric, v.status) for v in verdicts] == [
        ("agreement", Status.ok),
        (DRIFT_METRIC, Status.breach),
    ]
    drift_off = monitors.model_copy(update={"drift": DriftMonitorConfig(enabled=False)})
    assert (
        len(evaluate("reviews", drift_off, accuracy=accuracy(stat(OVERALL, 1, 1)), drift=None)) == 1
    )
    both_off = MonitorsConfig(
        accuracy=AccuracyMonitorConfig(enabled=False), drift=DriftMonitorConfig(enabled=False)
    )
    assert evaluate("reviews", both_off, accuracy=None, drift=None) == []


def test_evaluate_refuses_a_missing_or_foreign_measurement() -> None:
    monitors = MonitorsConfig(accuracy=ACCURACY, drift=DRIFT)
    with pytest.raises(MonitoringError, match="no accuracy measurement was given"):
        evaluate("reviews", monitors, accuracy=None, drift=None)
    with pytest.raises(MonitoringError, match="accuracy measurement of task 'reviews'"):
        evaluate("other", monitors, accuracy=accuracy(stat(OVERALL, 1, 1)), drift=None)


# --------------------------------------------------------------------------- alerts


def test_a_breach_alerts_once_then_recovers_once() -> None:
    state = AlertState()
    state, events = transition(state, [verdict(Status.breach)])
    assert len(events) == 1
    event = events[0]
    assert (event.kind, event.severity) == (EventKind.breach, Severity.critical)
    assert (event.task, event.metric, event.segment) == ("reviews", "agreement", OVERALL)
    assert (event.value, event.threshold, event.window, event.samples) == (0.8, 0.9, 1000, 500)
    assert event.interval == (0.75, 0.85)
    assert state.breached == {AlertKey("reviews", "agreement", OVERALL)}

    # Still breached: no new event, same state.
    again, events = transition(state, [verdict(Status.breach)])
    assert (again, events) == (state, [])

    # No data: neither a new alert nor a recovery.
    again, events = transition(state, [verdict(Status.insufficient_data)])
    assert (again, events) == (state, [])

    state, events = transition(state, [verdict(Status.ok)])
    assert [(e.kind, e.severity, e.value) for e in events] == [
        (EventKind.recovered, Severity.info, 0.95)
    ]
    assert state.breached == frozenset()

    # Fine and already fine: nothing to say.
    assert transition(state, [verdict(Status.ok)]) == (state, [])


def test_insufficient_data_never_opens_a_breach() -> None:
    assert transition(AlertState(), [verdict(Status.insufficient_data)]) == (AlertState(), [])


def test_keys_are_independent_and_severity_follows_scope() -> None:
    segment = verdict(Status.breach, segment="kind=plot")
    drifted = verdict(Status.breach, metric=DRIFT_METRIC)
    state, events = transition(AlertState(), [verdict(Status.ok), segment, drifted])
    assert [(e.segment, e.metric, e.severity) for e in events] == [
        ("kind=plot", "agreement", Severity.warning),
        (OVERALL, DRIFT_METRIC, Severity.warning),
    ]
    # The segment recovers; drift gets no verdict this time and stays open.
    state, events = transition(state, [verdict(Status.ok, segment="kind=plot")])
    assert [(e.kind, e.segment) for e in events] == [(EventKind.recovered, "kind=plot")]
    assert state.breached == {AlertKey("reviews", DRIFT_METRIC, OVERALL)}


def test_two_verdicts_for_one_key_are_refused() -> None:
    with pytest.raises(MonitoringError, match="two verdicts for the same task"):
        transition(AlertState(), [verdict(Status.ok), verdict(Status.breach)])

"""Accuracy over the last comparisons: the Wilson interval against known values,
the window, per-segment statistics and the minimum sample count."""

from __future__ import annotations

from typing import Any

import pytest

from distilld.monitoring.accuracy import (
    OVERALL,
    Comparison,
    measure_accuracy,
    segment_labels,
    wilson_interval,
)
from distilld.monitoring.config import AccuracyMonitorConfig, SegmentAccuracyConfig
from distilld.monitoring.features import MonitoringError


def comparison(score: float, t: float, *segments: str, **changes: Any) -> Comparison:
    fields: dict[str, Any] = {
        "task": "reviews",
        "request_id": f"r{t}",
        "segments": segments,
        "student_output": "fresh",
        "teacher_output": "fresh" if score == 1.0 else "rotten",
        "student_confidence": 0.9,
        "teacher_confidence": 0.95,
        "model_version": "v1",
        "score": score,
        "schema_valid": True,
        "timestamp": t,
    }
    fields.update(changes)
    return Comparison(**fields)


def test_wilson_matches_known_values() -> None:
    low, high = wilson_interval(8, 10, 0.95)
    assert low == pytest.approx(0.4902, abs=5e-4)
    assert high == pytest.approx(0.9433, abs=5e-4)
    # 0 successes: the lower bound is 0, the upper z²/(n+z²).
    low, high = wilson_interval(0, 10, 0.95)
    assert low == 0.0
    assert high == pytest.approx(0.2775, abs=5e-4)
    low, high = wilson_interval(10, 10, 0.95)
    assert high == 1.0
    assert low == pytest.approx(0.7225, abs=5e-4)
    # Wider at a higher confidence level, narrower with more samples.
    assert wilson_interval(80, 100, 0.99)[0] < wilson_interval(80, 100, 0.95)[0]
    assert wilson_interval(800, 1000)[1] - wilson_interval(800, 1000)[0] < 0.06
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_refuses_impossible_counts() -> None:
    with pytest.raises(MonitoringError, match="successes=11, n=10"):
        wilson_interval(11, 10)
    with pytest.raises(MonitoringError, match="confidence level"):
        wilson_interval(1, 10, 1.0)


def test_overall_value_over_the_most_recent_window() -> None:
    config = AccuracyMonitorConfig(window=10, min_samples=5)
    # 10 old failures, then 10 recent successes, given out of order.
    history = [comparison(0.0, t) for t in range(10)] + [comparison(1.0, t) for t in range(10, 20)]
    measurement = measure_accuracy(
        list(reversed(history)), config, task="reviews", metric="agreement"
    )
    overall = measurement.overall
    assert overall.segment == OVERALL
    assert overall.samples == 10
    assert overall.value == 1.0
    assert overall.sufficient
    assert (overall.low, overall.high) == pytest.approx(wilson_interval(10, 10))
    assert measurement.window == 10
    assert measurement.metric == "agreement"


def test_fractional_scores_are_averaged() -> None:
    config = AccuracyMonitorConfig(window=100, min_samples=1)
    measurement = measure_accuracy(
        [comparison(0.5, 1), comparison(1.0, 2), comparison(0.75, 3)],
        config,
        task="reviews",
        metric="field_f1",
    )
    assert measurement.overall.value == pytest.approx(0.75)


def test_below_min_samples_the_value_is_shown_but_not_sufficient() -> None:
    config = AccuracyMonitorConfig(window=100, min_samples=20)
    measurement = measure_accuracy(
        [comparison(1.0, t) for t in range(5)], config, task="reviews", metric="agreement"
    )
    assert measurement.overall.value == 1.0
    assert not measurement.overall.sufficient
    empty = measure_accuracy([], config, task="reviews", metric="agreement")
    assert empty.overall.samples == 0
    assert empty.overall.value is None
    assert (empty.overall.low, empty.overall.high) == (0.0, 1.0)


def test_per_segment_statistics_and_their_own_minimum() -> None:
    config = AccuracyMonitorConfig(
        window=100, min_samples=10, segments=SegmentAccuracyConfig(min_samples=8)
    )
    good = [comparison(1.0, t, "kind=review", "length=<64") for t in range(30)]
    bad = [comparison(0.0, 100 + t, "kind=plot", "length=>=1024") for t in range(6)]
    measurement = measure_accuracy(good + bad, config, task="reviews", metric="agreement")
    by_label = {s.segment: s for s in measurement.segments}
    assert list(by_label) == sorted(by_label)
    assert by_label["kind=review"].value == 1.0
    assert by_label["kind=review"].sufficient
    assert by_label["kind=plot"].value == 0.0
    assert by_label["kind=plot"].samples == 6
    assert not by_label["kind=plot"].sufficient  # 6 < 8
    assert by_label["kind=plot"].min_samples == 8


def test_segment_keys_filter_and_switch() -> None:
    rows = [comparison(1.0, t, "kind=review", "length=<64") for t in range(5)]
    only_kind = AccuracyMonitorConfig(
        window=10, min_samples=1, segments=SegmentAccuracyConfig(keys=["kind"])
    )
    measurement = measure_accuracy(rows, only_kind, task="reviews", metric="agreement")
    assert [s.segment for s in measurement.segments] == ["kind=review"]
    off = AccuracyMonitorConfig(
        window=10, min_samples=1, segments=SegmentAccuracyConfig(enabled=False)
    )
    assert measure_accuracy(rows, off, task="reviews", metric="agreement").segments == ()


def test_segments_beyond_the_cap_per_key_are_pooled_as_other() -> None:
    # Stored rows may hold any number of values of a key (rows from before the cap,
    # another writer): a check still reports at most max_values_per_key of them.
    rows = [comparison(1.0, t, "source=app", "length=<64") for t in range(6)]
    rows += [comparison(1.0, 10 + t, "source=web", "length=<64") for t in range(4)]
    rows += [comparison(0.0, 20 + i, f"source=id-{i}", "length=<64") for i in range(500)]
    rows.append(comparison(0.0, 600, "source=other", "length=<64"))
    config = AccuracyMonitorConfig(window=1000, min_samples=1)
    measurement = measure_accuracy(
        rows, config, task="reviews", metric="agreement", max_values_per_key=3
    )
    by_label = {s.segment: s for s in measurement.segments}
    # The 3 most frequent sources are kept; 500 one-off ids join the existing "other".
    assert sorted(by_label) == [
        "length=<64",
        "source=app",
        "source=id-0",
        "source=other",
        "source=web",
    ]
    assert by_label["source=other"].samples == 500
    assert by_label["source=other"].value == 0.0
    assert sum(s.samples for s in measurement.segments if s.segment != "length=<64") == 511
    # The default cap (50) bounds them too.
    default = measure_accuracy(rows, config, task="reviews", metric="agreement")
    assert len(default.segments) == 1 + 50 + 1


def test_model_version_filter_and_task_check() -> None:
    config = AccuracyMonitorConfig(window=10, min_samples=1)
    rows = [comparison(0.0, 1, model_version="v1"), comparison(1.0, 2, model_version="v2")]
    measurement = measure_accuracy(
        rows, config, task="reviews", metric="agreement", model_version="v2"
    )
    assert measurement.overall.samples == 1
    assert measurement.overall.value == 1.0
    with pytest.raises(MonitoringError, match="received a comparison of task 'other'"):
        measure_accuracy(
            [comparison(1.0, 1, task="other")], config, task="reviews", metric="agreement"
        )


def test_comparison_validation() -> None:
    with pytest.raises(MonitoringError, match=r"score must lie in \[0, 1\] \(received 1.2\)"):
        comparison(1.2, 1)
    with pytest.raises(MonitoringError, match="not of the form key=value"):
        comparison(1.0, 1, "review")


def test_segment_labels() -> None:
    assert segment_labels({"length": "<64", "kind": "a=b"}) == ("kind=a=b", "length=<64")
    with pytest.raises(MonitoringError, match="must not contain '='"):
        segment_labels({"a=b": "c"})

"""A daemon's /metrics registry, read back with prometheus_client's parser."""

from __future__ import annotations

import math

import pytest

from distilld import __version__
from distilld.telemetry.alerts import AlertTally
from distilld.telemetry.metrics import (
    CONTENT_TYPE,
    DEFAULT_LATENCY_BUCKETS,
    DaemonTelemetry,
    MetricsSnapshot,
    TaskMetrics,
    latency_histogram,
)
from support.metrics import families, samples, value

#: The daemon's own families, by the name the parser gives them.
DAEMON_FAMILIES = {
    "distilld_build_info": "gauge",
    "distilld_alerts": "counter",
    "distilld_requests": "counter",
    "distilld_request_latency_seconds": "histogram",
    "distilld_dead_letters": "counter",
    "distilld_teacher_calls": "counter",
    "distilld_teacher_budget_left": "gauge",
    "distilld_agreement_ratio": "gauge",
    "distilld_drift_share_ratio": "gauge",
    "distilld_agreement": "gauge",
    "distilld_drift_share": "gauge",
    "distilld_retrainings": "counter",
    "distilld_live_version_info": "gauge",
    "distilld_policy_breach": "gauge",
    "distilld_consumer_lag_records": "gauge",
}


def _snapshot() -> MetricsSnapshot:
    histogram = latency_histogram()
    for seconds in (0.004, 0.02, 0.02, 0.3, 0.3, 2.0):
        histogram.observe(seconds)
    return MetricsSnapshot(
        tasks={
            "sentiment": TaskMetrics(
                requests=1200,
                latency=[histogram],
                dead_letters={"invalid_json": 4, "too_large": 1},
                teacher_calls=57,
                teacher_budget_left=943,
                agreement=0.925,
                drift_share=0.125,
                retrainings={"promoted": 2, "gate_failed": 1},
                live_version="v0003",
                breaches={("agreement", "all"): True, ("agreement", "lang=de"): False},
            ),
            "address": TaskMetrics(requests=7),  # nothing measured yet
        },
        consumer_lag={("requests", 0): 12, ("requests", 1): 0},
    )


def _scrape(snapshot: MetricsSnapshot, alerts: AlertTally | None = None) -> str:
    telemetry = DaemonTelemetry(lambda: snapshot, alerts=alerts or AlertTally())
    return telemetry.exposition().decode("utf-8")


def test_the_existing_names_and_the_conventions_are_exposed() -> None:
    text = _scrape(_snapshot())
    found = families(text)
    assert {name: found.get(name) for name in DAEMON_FAMILIES} == DAEMON_FAMILIES
    assert any(name.startswith("process_") for name in found)  # ProcessCollector
    assert "python_info" in found  # PlatformCollector
    assert "python_gc_objects_collected" in found  # GCCollector
    parsed = samples(text)
    assert value(parsed, "distilld_build_info", version=__version__) == 1
    assert value(parsed, "distilld_requests_total", task="sentiment") == 1200
    assert value(parsed, "distilld_requests_total", task="address") == 7
    assert value(parsed, "distilld_dead_letters_total", task="sentiment", reason="too_large") == 1
    assert value(parsed, "distilld_teacher_calls_total", task="sentiment") == 57
    assert value(parsed, "distilld_teacher_budget_left", task="sentiment") == 943
    assert value(parsed, "distilld_agreement_ratio", task="sentiment") == 0.925
    assert value(parsed, "distilld_agreement", task="sentiment") == 0.925
    assert value(parsed, "distilld_drift_share_ratio", task="sentiment") == 0.125
    assert value(parsed, "distilld_retrainings_total", task="sentiment", outcome="promoted") == 2
    assert value(parsed, "distilld_live_version_info", task="sentiment", version="v0003") == 1
    breach = "distilld_policy_breach"
    assert value(parsed, breach, task="sentiment", metric="agreement", segment="all") == 1
    assert value(parsed, breach, task="sentiment", metric="agreement", segment="lang=de") == 0
    assert value(parsed, "distilld_consumer_lag_records", topic="requests", partition="0") == 12
    assert value(parsed, "distilld_consumer_lag_records", topic="requests", partition="1") == 0


def test_unknown_gauges_are_left_out_not_reported_as_zero() -> None:
    parsed = samples(_scrape(_snapshot()))
    for name in (
        "distilld_teacher_budget_left",
        "distilld_agreement_ratio",
        "distilld_drift_share_ratio",
        "distilld_live_version_info",
    ):
        tasks = {dict(labels)["task"] for n, labels in parsed if n == name}
        assert tasks == {"sentiment"}, name
    assert value(parsed, "distilld_teacher_calls_total", task="address") == 0


def test_latency_is_a_cumulative_histogram_summed_over_loops() -> None:
    one, two = latency_histogram(), latency_histogram()
    one.observe(0.02)
    two.observe(0.02)
    two.observe(60.0)
    snapshot = MetricsSnapshot({"t": TaskMetrics(latency=[one, two]), "idle": TaskMetrics()})
    parsed = samples(_scrape(snapshot))
    name = "distilld_request_latency_seconds"
    assert value(parsed, f"{name}_bucket", task="t", le="0.01") == 0
    assert value(parsed, f"{name}_bucket", task="t", le="0.025") == 2
    assert value(parsed, f"{name}_bucket", task="t", le="30.0") == 2
    assert value(parsed, f"{name}_bucket", task="t", le="+Inf") == 3
    assert value(parsed, f"{name}_count", task="t") == 3
    assert value(parsed, f"{name}_sum", task="t") == pytest.approx(60.04)
    # a task without observations has every default bucket, at 0
    idle = sorted(
        (float(dict(labels)["le"]), v)
        for (n, labels), v in parsed.items()
        if n == f"{name}_bucket" and dict(labels)["task"] == "idle"
    )
    assert [le for le, _ in idle] == [*DEFAULT_LATENCY_BUCKETS, math.inf]
    assert all(v == 0 for _, v in idle)


def test_label_values_with_quotes_and_newlines_parse_back() -> None:
    reason = 'bad "json"\\ here\nand a line'
    snapshot = MetricsSnapshot({'t"1': TaskMetrics(dead_letters={reason: 2}, live_version="v\\1")})
    parsed = samples(_scrape(snapshot))
    assert value(parsed, "distilld_dead_letters_total", task='t"1', reason=reason) == 2
    assert value(parsed, "distilld_live_version_info", task='t"1', version="v\\1") == 1


def test_alerts_are_counted_by_event_and_severity() -> None:
    tally = AlertTally()
    tally.add("teacher.unavailable", "warning")
    tally.add("teacher.unavailable", "warning")
    tally.add("monitor.breach", "critical")
    parsed = samples(_scrape(MetricsSnapshot(), tally))
    total = "distilld_alerts_total"
    assert value(parsed, total, event="teacher.unavailable", severity="warning") == 2
    assert value(parsed, total, event="monitor.breach", severity="critical") == 1


def test_two_daemons_in_one_process_have_registries_of_their_own() -> None:
    first = DaemonTelemetry(lambda: MetricsSnapshot({"a": TaskMetrics(requests=1)}))
    second = DaemonTelemetry(lambda: MetricsSnapshot({"b": TaskMetrics(requests=2)}))
    one, two = samples(first.exposition().decode()), samples(second.exposition().decode())
    assert value(one, "distilld_requests_total", task="a") == 1
    assert ("distilld_requests_total", frozenset({("task", "b")})) not in one
    assert value(two, "distilld_requests_total", task="b") == 2


def test_the_content_type_is_the_text_format() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"

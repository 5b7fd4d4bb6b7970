"""The alert sink: one alert per breach, recoveries, state that survives a restart.

Real parts: verdicts from the policy evaluation (measure_accuracy + evaluate
on real Comparison records), the SqliteStore, the structlog log events, and for
the alerts topic the session's Tansu broker with kafka-python.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition

from distilld.alerts import AlertSink, segment_dict, segment_label
from distilld.monitoring.accuracy import Comparison, measure_accuracy
from distilld.monitoring.config import MonitorsConfig
from distilld.monitoring.evaluate import EventKind, Severity, Verdict, evaluate
from distilld.settings import KafkaConfig
from distilld.store.sqlite import SqliteStore
from distilld.traffic.kafka import ensure_topics, make_consumer, make_producer
from support.kafka import unique
from support.logs import Event, alerts, named

TASK = "reviews"
MONITORS = MonitorsConfig.model_validate(
    {
        "accuracy": {
            "window": 100,
            "min_samples": 40,
            "threshold": 0.8,
            "breach_when": "estimate",
            "segments": {"min_samples": 20},
        },
        "drift": {"enabled": False},
    }
)


def verdicts(review_agreement: float, plot_agreement: float) -> list[Verdict]:
    """One check over 50 review and 50 plot comparisons at the given agreement rates."""
    comparisons = []
    for kind, rate in (("review", review_agreement), ("plot", plot_agreement)):
        agreeing = round(rate * 50)
        for i in range(50):
            comparisons.append(
                Comparison(
                    task=TASK,
                    request_id=f"{kind}-{i}",
                    segments=(f"kind={kind}",),
                    student_output="fresh",
                    teacher_output="fresh" if i < agreeing else "rotten",
                    student_confidence=0.9,
                    teacher_confidence=0.9,
                    model_version="v1",
                    score=1.0 if i < agreeing else 0.0,
                    schema_valid=True,
                    timestamp=float(i),
                )
            )
    accuracy = measure_accuracy(comparisons, MONITORS.accuracy, task=TASK, metric="agreement")
    return evaluate(TASK, MONITORS, accuracy=accuracy, drift=None)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.db")
    yield s
    s.close()


def test_a_segment_breach_is_alerted_once_and_its_recovery_too(
    store: SqliteStore, logs: list[Event]
) -> None:
    sink = AlertSink(store, tasks=[TASK])
    assert sink.handle(TASK, verdicts(1.0, 0.95)) == []  # all fine: nothing to say

    # Plot summaries degrade; overall (0.85, then 0.81) stays above the bar of 0.8.
    first = sink.handle(TASK, verdicts(1.0, 0.7))
    again = sink.handle(TASK, verdicts(1.0, 0.62))  # the breach goes on: no new alert
    recovered = sink.handle(TASK, verdicts(1.0, 0.9))

    assert [(e.kind, e.segment) for e in first] == [(EventKind.breach, "kind=plot")]
    assert first[0].severity is Severity.warning
    assert again == []
    assert [(e.kind, e.segment) for e in recovered] == [(EventKind.recovered, "kind=plot")]

    lines = alerts(logs)
    assert [line["event"] for line in lines] == ["monitor.breach", "monitor.recovered"]
    breach = lines[0]
    assert breach["task"] == TASK
    assert breach["metric"] == "agreement"
    assert breach["segment"] == "kind=plot"
    assert breach["value"] == pytest.approx(0.7)
    assert breach["threshold"] == 0.8
    assert breach["window"] == 100
    assert breach["samples"] == 50
    assert breach["severity"] == "warning"
    assert "kind=plot" in breach["action"]
    assert lines[1]["severity"] == "info"

    stored = store.last_alerts(TASK)
    assert [(a.kind, a.metric, a.segment) for a in stored] == [
        ("breach", "agreement", {"kind": "plot"}),
        ("recovered", "agreement", {"kind": "plot"}),
    ]
    assert stored[0].value == pytest.approx(0.7)
    assert stored[0].payload["event"] == "monitor.breach"


def test_a_restart_during_a_breach_does_not_alert_it_again(
    store: SqliteStore, logs: list[Event]
) -> None:
    before = AlertSink(store, tasks=[TASK])
    opened = before.handle(TASK, verdicts(0.5, 0.5))  # overall and both segments breach
    assert {e.segment for e in opened} == {"all", "kind=review", "kind=plot"}
    assert [e.severity for e in opened if e.segment == "all"] == [Severity.critical]

    after = AlertSink(store, tasks=[TASK])  # the daemon restarted
    assert after.state(TASK) == before.state(TASK)
    assert after.handle(TASK, verdicts(0.5, 0.5)) == []
    # The reviews recover after the restart: reported, once.
    recovered = after.handle(TASK, verdicts(0.95, 0.5))
    assert {(e.kind, e.segment) for e in recovered} == {(EventKind.recovered, "kind=review")}

    events = [line["event"] for line in alerts(logs)]
    assert events.count("monitor.breach") == 3
    assert events.count("monitor.recovered") == 1


def test_a_failing_producer_does_not_lose_the_alert(store: SqliteStore, logs: list[Event]) -> None:
    def broken_send(topic: str, value: bytes) -> None:
        raise ConnectionError("broker gone")

    sink = AlertSink(store, send=broken_send, topic="alerts")
    events = sink.handle(TASK, verdicts(1.0, 0.7))
    assert len(events) == 1
    assert [line["event"] for line in alerts(logs)] == ["monitor.breach"]
    assert len(named(logs, "alerts.produce_failed")) == 1
    assert len(store.last_alerts(TASK)) == 1


def test_alert_events_are_produced_to_the_alerts_topic(
    store: SqliteStore, kafka_config: KafkaConfig
) -> None:
    topic = unique("alerts")
    ensure_topics(kafka_config, [topic], partitions=1)
    producer = make_producer(kafka_config)
    try:
        sink = AlertSink(
            store, send=lambda t, value: producer.send(t, value).get(timeout=30), topic=topic
        )
        sink.handle(TASK, verdicts(1.0, 0.7))
        sink.handle(TASK, verdicts(1.0, 1.0))
    finally:
        producer.close()

    consumer = make_consumer(kafka_config, None)
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        records: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while len(records) < 2 and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(json.loads(r.value) for r in batch)
    finally:
        consumer.close()
    assert [r["event"] for r in records] == ["monitor.breach", "monitor.recovered"]
    assert records[0]["task"] == TASK
    assert records[0]["segment"] == "kind=plot"
    assert records[0]["threshold"] == 0.8
    assert isinstance(records[0]["created_at"], float)


def test_segment_labels_round_trip_through_the_store_form(store: SqliteStore) -> None:
    assert segment_dict("all") is None
    assert segment_dict("kind=plot") == {"kind": "plot"}
    assert segment_dict("length=<64") == {"length": "<64"}
    for label in ("all", "kind=plot", "length=64-255", "note=a=b"):
        assert segment_label(segment_dict(label)) == label
    with pytest.raises(ValueError, match="topic"):
        AlertSink(store, send=lambda topic, value: None)  # a producer needs a topic


def test_breach_states_are_open_while_a_breach_lasts_and_closed_after(
    store: SqliteStore, logs: list[Event]
) -> None:
    # What distilld_policy_breach{task,metric,segment} reports at each scrape.
    sink = AlertSink(store, tasks=[TASK])
    assert sink.breaches(TASK) == {}
    sink.handle(TASK, verdicts(1.0, 0.7))
    assert sink.breaches(TASK) == {("agreement", "kind=plot"): True}
    sink.handle(TASK, verdicts(1.0, 0.9))
    assert sink.breaches(TASK) == {("agreement", "kind=plot"): False}
    sink.handle(TASK, verdicts(1.0, 0.7))  # it breaches again
    assert sink.breaches(TASK) == {("agreement", "kind=plot"): True}
    restarted = AlertSink(store, tasks=[TASK])  # an open breach is restored from the store
    assert restarted.breaches(TASK) == {("agreement", "kind=plot"): True}

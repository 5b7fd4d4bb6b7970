"""The serving loop's handling of a failing student and of batching, on a real broker.

The student here is the labelled FakeStudent: these tests are about the
loop's machinery (isolation of a poison input, batch sizes), not a model.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import pytest

from distilld.log import configure_logging
from distilld.serving.base import Prediction
from distilld.serving.fake import FakeStudent
from distilld.settings import KafkaConfig
from distilld.traffic.kafka import ensure_topics, make_consumer, make_producer
from distilld.traffic.loop import AnsweredHook, ServingLoop, TaskRoute
from distilld.traffic.records import Request
from distilld.traffic.replay import read_topic, replay
from support.kafka import unique


def _route(task: str, batch: int, wait_ms: int) -> TaskRoute:
    return TaskRoute(
        task=task,
        requests_topic=f"{task}.requests",
        responses_topic=f"{task}.responses",
        dead_letter_topic=f"{task}.dead-letter",
        max_input_chars=1000,
        batch_max_size=batch,
        batch_max_wait_ms=wait_ms,
    )


def _serve(
    kafka: KafkaConfig,
    route: TaskRoute,
    student: FakeStudent,
    lines: list[bytes],
    expect: int,
    on_answered: AnsweredHook | None = None,
) -> tuple[list[dict[str, object]], list[dict[str, object]], ServingLoop]:
    ensure_topics(kafka, [route.requests_topic, route.responses_topic, route.dead_letter_topic])
    replay(kafka, lines, route.requests_topic)
    consumer = make_consumer(kafka, group_id=unique("group"))
    producer = make_producer(kafka)
    loop = ServingLoop(
        consumer,
        producer,
        [route],
        {route.task: student},
        fallback_dead_letter_topic="unused.dead-letter",
        max_message_bytes=100_000,
        on_answered=on_answered,
    )
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,))
    thread.start()
    try:
        responses = read_topic(
            kafka, route.responses_topic, until=lambda r: len(r) >= expect, timeout_s=60
        )
        dead = read_topic(
            kafka,
            route.dead_letter_topic,
            until=lambda r: len(r) >= len(lines) - expect,
            timeout_s=30,
        )
    finally:
        stop.set()
        thread.join(timeout=60)
        consumer.close(autocommit=False)
        producer.close()
    return responses, dead, loop


def test_a_poison_input_is_isolated_and_dead_lettered_the_rest_answered(
    kafka_config: KafkaConfig, tmp_path: Path
) -> None:
    task = unique("poison")
    route = _route(task, batch=8, wait_ms=50)
    lines = [
        json.dumps(
            {"id": f"p-{i}", "task": task, "input": "POISON here" if i == 5 else f"text {i}"}
        ).encode()
        for i in range(16)
    ]
    student = FakeStudent(["a", "b"], fail_on="POISON")
    responses, dead, loop = _serve(kafka_config, route, student, lines, expect=15)
    assert sorted(r["id"] for r in responses) == sorted(f"p-{i}" for i in range(16) if i != 5)
    assert len(dead) == 1
    assert dead[0]["reason"] == "student_failed"
    assert dead[0]["id"] == "p-5"
    assert "POISON" in str(dead[0]["detail"])
    assert base64.b64decode(str(dead[0]["original_base64"])) == lines[5]
    assert loop.stats.dead_lettered == {"student_failed": 1}
    # The failing batch was retried one input at a time.
    assert 1 in student.batches


def test_each_answer_is_handed_to_the_shadow_hook_with_its_version(
    kafka_config: KafkaConfig,
) -> None:
    task = unique("hook")
    route = _route(task, batch=4, wait_ms=20)
    lines = [
        json.dumps(
            {"id": f"h-{i}", "task": task, "input": f"text {i}", "metadata": {"shop": "s1"}}
        ).encode()
        for i in range(10)
    ]
    seen: list[tuple[Request, Prediction, str]] = []
    student = FakeStudent(["a", "b"])
    responses, _dead, _loop = _serve(
        kafka_config,
        route,
        student,
        lines,
        expect=10,
        on_answered=lambda request, prediction, version: seen.append(
            (request, prediction, version)
        ),
    )
    assert sorted(r.id for r, _, _ in seen) == sorted(f"h-{i}" for i in range(10))
    by_id = {str(r["id"]): r for r in responses}
    for request, prediction, version in seen:
        assert request.metadata == {"shop": "s1"}
        assert prediction.output == by_id[request.id]["output"]
        assert version == by_id[request.id]["model_version"] == student.model_version


def test_a_failing_shadow_hook_never_stops_serving(
    kafka_config: KafkaConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    task = unique("hookfail")
    route = _route(task, batch=4, wait_ms=20)
    lines = [
        json.dumps({"id": f"f-{i}", "task": task, "input": f"text {i}"}).encode() for i in range(12)
    ]

    def broken(_request: Request, _prediction: Prediction, _version: str) -> None:
        raise RuntimeError("shadow queue exploded")

    responses, _dead, _loop = _serve(
        kafka_config, route, FakeStudent(["a", "b"]), lines, expect=12, on_answered=broken
    )
    assert len({r["id"] for r in responses}) == 12
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    failures = [e for e in events if e.get("event") == "shadow.hook_failed"]
    assert len(failures) == 1  # reported once, not once per answer
    assert "shadow queue exploded" in failures[0]["error"]


def test_backlog_is_answered_in_full_batches(kafka_config: KafkaConfig) -> None:
    task = unique("batching")
    route = _route(task, batch=8, wait_ms=1000)
    lines = [
        json.dumps({"id": f"b-{i}", "task": task, "input": f"text {i}"}).encode() for i in range(64)
    ]
    student = FakeStudent(["a", "b"])
    responses, _dead, _loop = _serve(kafka_config, route, student, lines, expect=64)
    assert len({r["id"] for r in responses}) == 64
    # With a backlog waiting, batches fill up instead of waiting max_wait_ms.
    assert max(student.batches) == 8
    assert sum(student.batches) == 64
    assert student.batches.count(8) >= 6


def test_an_unavailable_student_holds_requests_until_it_returns(
    kafka_config: KafkaConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    task = unique("outage")
    route = _route(task, batch=4, wait_ms=10)
    ensure_topics(
        kafka_config, [route.requests_topic, route.responses_topic, route.dead_letter_topic]
    )
    student = FakeStudent(["a", "b"])
    student.available = False
    consumer = make_consumer(kafka_config, group_id=unique("group"))
    producer = make_producer(kafka_config)
    loop = ServingLoop(
        consumer,
        producer,
        [route],
        {task: student},
        fallback_dead_letter_topic="unused.dead-letter",
        max_message_bytes=100_000,
    )
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,))
    thread.start()
    try:
        lines = [
            json.dumps({"id": f"o-{i}", "task": task, "input": f"t{i}"}).encode() for i in range(40)
        ]
        replay(kafka_config, lines, route.requests_topic)
        deadline = time.monotonic() + 30
        while loop.stats.polled == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # the outage lasts a while: several retries happen
        # Nothing answered, nothing dead-lettered, and consumption paused
        # after the first batch instead of piling the topic up in memory.
        assert loop.stats.answered == 0
        assert not loop.stats.dead_lettered
        assert 0 < loop.stats.polled < 40
        student.available = True
        responses = read_topic(
            kafka_config, route.responses_topic, until=lambda r: len(r) >= 40, timeout_s=60
        )
    finally:
        stop.set()
        thread.join(timeout=60)
        consumer.close(autocommit=False)
        producer.close()
    assert sorted(r["id"] for r in responses) == sorted(f"o-{i}" for i in range(40))
    assert loop.stats.dead_lettered == {}
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    unavailable = [e for e in events if e["event"] == "student.unavailable"]
    assert len(unavailable) == 1, "one alert per outage, not one per retry"
    assert unavailable[0]["alert"] is True
    assert any(e["event"] == "student.available_again" for e in events)

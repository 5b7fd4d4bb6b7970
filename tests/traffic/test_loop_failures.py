"""The serving loop's handling of a failing student and of batching, on a real broker.

The student here is the labelled FakeStudent: these tests are about the
loop's machinery (isolation of a poison input, batch sizes), not a model.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
from collections.abc import Sequence
from pathlib import Path

import httpx

from distilld.serving.base import Prediction, StudentBackend
from distilld.serving.fake import FakeStudent
from distilld.serving.vllm import VllmStudent, VllmTarget
from distilld.settings import KafkaConfig
from distilld.traffic.kafka import ensure_topics, make_consumer, make_producer
from distilld.traffic.loop import AnsweredHook, ServingLoop, TaskRoute
from distilld.traffic.records import Request
from distilld.traffic.replay import read_topic, replay
from support.kafka import unique
from support.logs import Event, alerts, named
from support.wait import wait_until


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
    student: StudentBackend,
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
    kafka_config: KafkaConfig, tmp_path: Path, logs: list[Event]
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
    # Alerted on the edges only: each failing spell once, each recovery once, in turn.
    edges = [e for e in alerts(logs) if e["event"] in ("student.failed", "student.recovered")]
    assert [e["event"] for e in edges[:2]] == ["student.failed", "student.recovered"]
    assert all(a["event"] != b["event"] for a, b in itertools.pairwise(edges))
    assert edges[-1]["event"] == "student.recovered"


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
    kafka_config: KafkaConfig, logs: list[Event]
) -> None:
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
    failures = named(logs, "shadow.hook_failed")
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


class CountingStudent(FakeStudent):
    """The FakeStudent, counting the calls it refused while switched off."""

    def __init__(self, labels: list[str]) -> None:
        super().__init__(labels)
        self.refused = 0

    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        if not self.available:
            self.refused += 1
        return super().predict(inputs)


def test_an_unavailable_student_holds_requests_until_it_returns(
    kafka_config: KafkaConfig, logs: list[Event]
) -> None:
    task = unique("outage")
    route = _route(task, batch=4, wait_ms=10)
    ensure_topics(
        kafka_config, [route.requests_topic, route.responses_topic, route.dead_letter_topic]
    )
    student = CountingStudent(["a", "b"])
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
        # The outage lasts a while: the first call and two retries are refused.
        wait_until(lambda: student.refused >= 3, 30, message=lambda: f"{student.refused} calls")
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
    unavailable = named(logs, "student.unavailable")
    assert len(unavailable) == 1, "one alert per outage, not one per retry"
    assert unavailable[0]["alert"] is True
    assert named(logs, "student.available_again")


def test_an_input_that_makes_a_healthy_vllm_answer_500_is_dead_lettered(
    kafka_config: KafkaConfig,
) -> None:
    """vLLM answers HTTP 500 for one input while /health answers 200: that input is
    dead-lettered and the rest answered, instead of the task being held forever."""
    task = unique("vllm500")
    route = _route(task, batch=8, wait_ms=50)
    lines = [
        json.dumps(
            {"id": f"v-{i}", "task": task, "input": "POISON here" if i == 3 else f"text {i}"}
        ).encode()
        for i in range(12)
    ]

    def vllm(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if "POISON" in json.loads(request.content)["input"][0]:
            return httpx.Response(500, json={"error": "Internal Server Error"})
        return httpx.Response(200, json={"data": [{"label": "a", "probs": [0.7, 0.3]}]})

    target = VllmTarget(base_url="http://vllm.test", model="m", kind="classify", labels=("a", "b"))
    student = VllmStudent(target, "v1", transport=httpx.MockTransport(vllm))
    try:
        responses, dead, loop = _serve(kafka_config, route, student, lines, expect=11)
    finally:
        student.close()
    assert sorted(r["id"] for r in responses) == sorted(f"v-{i}" for i in range(12) if i != 3)
    assert [(d["id"], d["reason"]) for d in dead] == [("v-3", "student_failed")]
    assert "HTTP 500" in str(dead[0]["detail"])
    assert loop.stats.dead_lettered == {"student_failed": 1}
    assert not loop.unavailable_tasks()

"""One oversized or refused record never freezes its partition (issue 15, item 1).

On a real broker: requests with a huge task name, id, metadata or 400,000
U+0085 characters (each under the 1 MB request limit) are dead-lettered with
records that fit the limit, the requests after them on the same partition are
answered, and the consumer group's committed offset moves past all of them.
Before the fix the U+0085 task made a 3.1 MB dead letter that the producer
refused (MessageSizeTooLargeError) and the loop resent forever, so the
committed offset stayed at the bad record.

The student is the labelled FakeStudent: these tests are about the loop's
machinery, not a model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer, TopicPartition

from distilld.serving.fake import FakeStudent
from distilld.settings import KafkaConfig
from distilld.traffic.kafka import ensure_topics, make_consumer, make_producer
from distilld.traffic.loop import ServingLoop, TaskRoute
from distilld.traffic.replay import read_topic
from support.kafka import unique
from support.logs import Event, named, rendered
from support.wait import wait_until

MAX_MESSAGE_BYTES = 1_000_000  # the default DISTILLD_KAFKA_MAX_MESSAGE_BYTES


def _route(task: str) -> TaskRoute:
    return TaskRoute(
        task=task,
        requests_topic=f"{task}.requests",
        responses_topic=f"{task}.responses",
        dead_letter_topic=f"{task}.dead-letter",
        max_input_chars=1_000,
        batch_max_size=8,
        batch_max_wait_ms=10,
    )


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def _produce(kafka: KafkaConfig, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    """Produce in this order to partition 0 (the requests topic has one partition)."""
    producer = make_producer(kafka)
    try:
        for key, value in records:
            producer.send(topic, value=value, key=key, partition=0)
        producer.flush()
    finally:
        producer.close()


def _committed(kafka: KafkaConfig, group: str, topic: str) -> int | None:
    admin = KafkaAdminClient(**kafka.client_kwargs())
    try:
        partition = TopicPartition(topic, 0)
        offsets = admin.list_group_offsets({group: [partition]}).get(group, {})
    finally:
        admin.close()
    meta = offsets.get(partition)
    return None if meta is None else int(meta.offset)


def _wait_committed(kafka: KafkaConfig, group: str, topic: str, wanted: int) -> int | None:
    seen: list[int | None] = []

    def reached() -> bool:
        seen.append(_committed(kafka, group, topic))
        return seen[-1] == wanted

    wait_until(
        reached,
        60,
        interval=0.5,
        message=lambda: f"committed offset {wanted} of {topic} (last seen: {seen[-1]})",
    )
    return seen[-1]


@contextmanager
def _serving(
    kafka: KafkaConfig, route: TaskRoute, group: str, producer: KafkaProducer
) -> Iterator[ServingLoop]:
    ensure_topics(kafka, [route.requests_topic], partitions=1)
    ensure_topics(kafka, [route.responses_topic, route.dead_letter_topic])
    consumer = make_consumer(kafka, group_id=group)
    loop = ServingLoop(
        consumer,
        producer,
        [route],
        {route.task: FakeStudent(["a", "b"])},
        fallback_dead_letter_topic=route.dead_letter_topic,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,))
    thread.start()
    try:
        yield loop
    finally:
        stop.set()
        thread.join(timeout=60)
        consumer.close(autocommit=False)
        producer.close()


def test_oversized_fields_are_dead_lettered_within_the_limit_and_the_partition_moves_on(
    kafka_config: KafkaConfig, logs: list[Event]
) -> None:
    task = unique("oversized")
    route = _route(task)
    group = unique("group")
    nel = "\u0085"  # repr() writes it as 4 characters, UTF-8 as 2 bytes
    bad: dict[str, tuple[bytes | None, bytes]] = {
        "large task": (b"a", _encode({"id": "a", "task": "t" * 600_000, "input": "hi"})),
        # keyed by its id, as `distilld replay` keys records: a 600 KB key too
        "large id": (b"i" * 600_000, _encode({"id": "i" * 600_000, "task": task, "input": "hi"})),
        "large metadata": (
            b"m",
            _encode({"id": "m", "task": task, "input": "hi", "metadata": {"k": "v" * 600_000}}),
        ),
        "U+0085 task": (b"u", _encode({"id": "u", "task": nel * 400_000, "input": "hi"})),
        "U+0085 metadata key": (
            b"uk",
            _encode({"id": "uk", "task": task, "input": "hi", "metadata": {nel * 400_000: 1}}),
        ),
        "U+0085 input": (b"ui", _encode({"id": "ui", "task": task, "input": nel * 400_000})),
    }
    assert all(len(value) < MAX_MESSAGE_BYTES for _, value in bad.values())
    good = [
        (f"g-{i}".encode(), _encode({"id": f"g-{i}", "task": task, "input": f"x{i}"}))
        for i in range(11)
    ]
    before, after = good[:1], good[1:]
    records = [*before, *bad.values(), *after]
    with _serving(kafka_config, route, group, make_producer(kafka_config)) as loop:
        _produce(kafka_config, route.requests_topic, records)
        responses = read_topic(
            kafka_config, route.responses_topic, until=lambda r: len(r) >= 11, timeout_s=60
        )
        dead = read_topic(
            kafka_config,
            route.dead_letter_topic,
            until=lambda r: len(r) >= len(bad),
            timeout_s=60,
            decode=False,
        )
        committed = _wait_committed(kafka_config, group, route.requests_topic, len(records))
        stats = loop.stats.snapshot()
    assert sorted(r["id"] for r in responses) == sorted(f"g-{i}" for i in range(11))
    assert committed == len(records), "the committed offset is stuck behind an oversized record"
    assert len(dead) == len(bad)
    for record in dead:
        size = len(record["_raw"]) + len(record["_key"] or b"")
        assert size <= MAX_MESSAGE_BYTES, size
    letters = [json.loads(record["_raw"]) for record in dead]
    assert sorted(letter["reason"] for letter in letters) == sorted(
        [
            "unknown_task",
            "wrong_type",
            "wrong_type",
            "unknown_task",
            "wrong_type",
            "input_too_large",
        ]
    )
    for letter in letters:
        assert len(letter["detail"]) <= 1_003
        assert len(letter.get("task", "")) <= 203
        assert len(letter["original_sha256"]) == 64
    assert stats["dropped"] == 0
    assert not named(logs, "serving.send_failed")
    # Every event, as the JSON renderer writes it, makes a line of bounded length.
    assert max(len(rendered([e])) for e in logs) < 20_000


def test_a_record_the_producer_refuses_is_replaced_by_a_minimal_dead_letter(
    kafka_config: KafkaConfig, logs: list[Event]
) -> None:
    # The producer's own limit stands for a broker whose limit is below
    # DISTILLD_KAFKA_MAX_MESSAGE_BYTES: MessageSizeTooLargeError, not retriable.
    task = unique("refused")
    route = _route(task)
    group = unique("group")
    labels = {f"key{i}": "v" * 250 for i in range(20)}  # a ~5.5 kB response
    records = [
        (b"big", _encode({"id": "big", "task": task, "input": "hi", "metadata": labels})),
        # a ~4 kB original: its full dead letter is over the limit, its minimal one is not
        (b"unknown", _encode({"id": "unknown", "task": "elsewhere", "input": "y" * 3_000})),
        *[
            (f"g-{i}".encode(), _encode({"id": f"g-{i}", "task": task, "input": f"x{i}"}))
            for i in range(10)
        ],
    ]
    producer = make_producer(kafka_config, max_request_size=4_000)
    with _serving(kafka_config, route, group, producer) as loop:
        _produce(kafka_config, route.requests_topic, records)
        responses = read_topic(
            kafka_config, route.responses_topic, until=lambda r: len(r) >= 10, timeout_s=60
        )
        dead = read_topic(
            kafka_config, route.dead_letter_topic, until=lambda r: len(r) >= 2, timeout_s=60
        )
        committed = _wait_committed(kafka_config, group, route.requests_topic, len(records))
        stats = loop.stats.snapshot()
    assert sorted(r["id"] for r in responses) == sorted(f"g-{i}" for i in range(10))
    assert committed == len(records)
    by_id = {letter["id"]: letter for letter in dead}
    assert set(by_id) == {"big", "unknown"}
    for letter in by_id.values():
        assert letter["reason"] == "send_refused"
        assert "MessageSizeTooLargeError" in letter["detail"]
        assert letter["original_base64"] == ""
        assert letter["original_truncated"] is True
    assert by_id["big"]["original_bytes"] == len(records[0][1])
    assert stats["dead_lettered_by_reason"] == {"send_refused": 1, "unknown_task": 1}
    refused = named(logs, "serving.send_refused")
    assert sorted(e["kind"] for e in refused) == ["dead_letter", "response"]
    assert not named(logs, "serving.send_failed")


def test_a_request_whose_minimal_dead_letter_is_refused_is_dropped_with_an_alert(
    kafka_config: KafkaConfig, logs: list[Event]
) -> None:
    # A limit so small that even the minimal dead letter is refused (no real
    # broker is set so low): the request is dropped, said so in an alert, and
    # the partition still moves on.
    task = unique("dropped")
    route = _route(task)
    group = unique("group")
    records = [
        (b"unknown", _encode({"id": "unknown", "task": "elsewhere", "input": "hi"})),
        *[
            (f"g{i}".encode(), _encode({"id": f"g{i}", "task": task, "input": f"x{i}"}))
            for i in range(5)
        ],
    ]
    producer = make_producer(kafka_config, max_request_size=400)
    with _serving(kafka_config, route, group, producer) as loop:
        _produce(kafka_config, route.requests_topic, records)
        responses = read_topic(
            kafka_config, route.responses_topic, until=lambda r: len(r) >= 5, timeout_s=60
        )
        committed = _wait_committed(kafka_config, group, route.requests_topic, len(records))
        stats = loop.stats.snapshot()
    assert sorted(r["id"] for r in responses) == sorted(f"g{i}" for i in range(5))
    assert committed == len(records)
    assert stats["dropped"] == 1
    dropped = named(logs, "serving.record_dropped")
    assert len(dropped) == 1
    assert dropped[0]["alert"] is True
    assert dropped[0]["severity"] == "error"
    assert dropped[0]["offset"] == 0
    assert dropped[0]["source_topic"] == route.requests_topic

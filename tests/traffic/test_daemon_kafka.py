"""The serving loop end to end: real Tansu broker, real MiniLM student, real reviews."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from distilld.demo.data import load_rows
from distilld.lifecycle import running_daemon
from distilld.policy.load import load_policy
from distilld.settings import KafkaConfig
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.records import MAX_DEAD_LETTER_ORIGINAL_BYTES, DeadLetterReason
from distilld.traffic.replay import read_topic, replay
from support.fuzz import fuzzed_records
from support.kafka import ServedTask, write_sentiment_policy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    return [r.text for r in load_rows() if r.label is not None and r.text.strip()][:3000]


def request(request_id: str, task: str, text: str, **extra: Any) -> bytes:
    return json.dumps({"id": request_id, "task": task, "input": text, **extra}).encode()


def ids_answered(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter(str(r.get("id")) for r in records)


def wait_for_ids(
    kafka: KafkaConfig, topic: str, ids: set[str], timeout_s: float = 120
) -> list[dict[str, Any]]:
    return read_topic(
        kafka, topic, until=lambda recs: ids <= set(ids_answered(recs)), timeout_s=timeout_s
    )


def test_requests_are_answered_on_the_responses_topic(
    tmp_path: Path, broker: EmbeddedBroker, minilm_sentiment_dir: Path, reviews: list[str]
) -> None:
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir)
    task, traffic = served.policy.task, served.policy.traffic
    lines = [
        request(f"rt-{i}", task, text, metadata={"channel": "web"})
        for i, text in enumerate(reviews[:300])
    ]
    with running_daemon(served.settings(broker), {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        replay(daemon.kafka, lines, traffic.requests_topic)
        responses = wait_for_ids(
            daemon.kafka, traffic.responses_topic, {f"rt-{i}" for i in range(300)}
        )
    by_id = {r["id"]: r for r in responses}
    assert len(by_id) == 300
    for i in range(300):
        response = by_id[f"rt-{i}"]
        assert response["_key"] == f"rt-{i}".encode()
        assert response["task"] == task
        assert response["output"] in ("fresh", "rotten")
        assert set(response["probabilities"]) == {"fresh", "rotten"}
        assert response["confidence"] == pytest.approx(max(response["probabilities"].values()))
        assert response["model_version"] == minilm_sentiment_dir.name
        assert response["latency_ms"] >= 0
        assert response["metadata"] == {"channel": "web"}


def test_each_kind_of_bad_input_is_dead_lettered_and_serving_continues(
    tmp_path: Path, broker: EmbeddedBroker, minilm_sentiment_dir: Path, reviews: list[str]
) -> None:
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir, max_input_chars=500)
    task, traffic = served.policy.task, served.policy.traffic
    bad: dict[str, bytes] = {
        "invalid_json": b'{"id": "x", "task": ',
        "invalid_utf8": b'{"id": "u", "task": "t", "input": "\xff\xfe"}',
        "not_an_object": b'["a", "list"]',
        "missing_field": json.dumps({"id": "m", "task": task}).encode(),
        "wrong_type": json.dumps({"id": "w", "task": task, "input": ["not", "text"]}).encode(),
        "unknown_task": request("k", "no-such-task", "hello"),
        "input_too_large": request("big", task, "y" * 501),
    }
    good_before = [request(f"before-{i}", task, reviews[i]) for i in range(20)]
    good_after = [request(f"after-{i}", task, reviews[100 + i]) for i in range(20)]
    with running_daemon(served.settings(broker), {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        replay(daemon.kafka, [*good_before, *bad.values(), *good_after], traffic.requests_topic)
        wanted = {f"before-{i}" for i in range(20)} | {f"after-{i}" for i in range(20)}
        responses = wait_for_ids(daemon.kafka, traffic.responses_topic, wanted)
        dead = read_topic(
            daemon.kafka,
            traffic.dead_letter_topic,
            until=lambda recs: len(recs) >= len(bad),
            timeout_s=60,
        )
        stats = daemon.stats()[0].snapshot()
    assert wanted <= set(ids_answered(responses))
    assert len(responses) == len(wanted), "a bad record was answered"
    by_reason = {d["reason"]: d for d in dead}
    assert sorted(by_reason) == sorted(bad)
    for reason, original in bad.items():
        letter = by_reason[reason]
        assert base64.b64decode(letter["original_base64"]) == original
        assert letter["source"]["topic"] == traffic.requests_topic
        assert isinstance(letter["source"]["offset"], int)
        assert isinstance(letter["source"]["partition"], int)
        assert letter["detail"]
    assert "no-such-task" in by_reason["unknown_task"]["detail"]
    assert "501" in by_reason["input_too_large"]["detail"]
    assert by_reason["input_too_large"]["id"] == "big"
    assert stats["dead_lettered"] == len(bad)
    assert stats["dead_lettered_by_reason"] == {reason: 1 for reason in bad}


def test_a_restarted_consumer_group_resumes_from_committed_offsets(
    tmp_path: Path, broker: EmbeddedBroker, minilm_sentiment_dir: Path, reviews: list[str]
) -> None:
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir)
    task, traffic = served.policy.task, served.policy.traffic
    first = {f"first-{i}" for i in range(100)}
    second = {f"second-{i}" for i in range(100)}
    settings = served.settings(broker)
    with running_daemon(settings, {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        replay(
            daemon.kafka,
            [request(f"first-{i}", task, reviews[i]) for i in range(100)],
            traffic.requests_topic,
        )
        wait_for_ids(daemon.kafka, traffic.responses_topic, first)
        kafka = daemon.kafka
    # Produced while no daemon runs: the next one must pick up exactly these.
    replay(
        kafka,
        [request(f"second-{i}", task, reviews[200 + i]) for i in range(100)],
        traffic.requests_topic,
    )
    with running_daemon(settings, {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        responses = wait_for_ids(daemon.kafka, traffic.responses_topic, first | second)
        time.sleep(1.0)  # room for a wrong re-delivery of the first batch to show up
        responses = read_topic(
            daemon.kafka, traffic.responses_topic, until=lambda recs: len(recs) > 200, timeout_s=3
        )
        polled_again = daemon.stats()[0].polled
    counts = ids_answered(responses)
    assert all(counts[i] == 1 for i in first | second), "a request was answered twice"
    assert polled_again == 100


def _start_daemon(served: ServedTask, broker: EmbeddedBroker, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **served.env(broker), "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "distilld", "run", "--policies", str(served.policies_dir)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing_and_sigterm_drains(
    tmp_path: Path, broker: EmbeddedBroker, minilm_sentiment_dir: Path, reviews: list[str]
) -> None:
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir)
    task, traffic = served.policy.task, served.policy.traffic
    kafka = served.settings(broker).kafka()
    total = 2000
    ids = {f"k-{i}" for i in range(total)}
    log = tmp_path / "daemon.log"
    first = _start_daemon(served, broker, log)
    try:
        replay(
            kafka,
            [request(f"k-{i}", task, reviews[i]) for i in range(total)],
            traffic.requests_topic,
        )
        # Kill it once it is well into the stream, mid-batch as far as it knows.
        before_kill = read_topic(
            kafka, traffic.responses_topic, until=lambda recs: len(recs) >= 400, timeout_s=180
        )
        assert len(before_kill) >= 400, log.read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    answered_before_kill = read_topic(
        kafka, traffic.responses_topic, until=lambda recs: False, timeout_s=2
    )
    assert len(answered_before_kill) < total, "the daemon finished before it was killed"

    second = _start_daemon(served, broker, log)
    try:
        # Generous: on a loaded 2-core machine the rest of the stream takes minutes.
        responses = wait_for_ids(kafka, traffic.responses_topic, ids, timeout_s=600)
        second.send_signal(signal.SIGTERM)
        exit_code = second.wait(timeout=60)
    finally:
        if second.poll() is None:
            second.kill()
    counts = ids_answered(responses)
    assert ids <= set(counts), (
        f"{len(ids - set(counts))} unanswered, e.g. {sorted(ids - set(counts))[:5]}; "
        f"daemon log tail:\n{log.read_text()[-3000:]}"
    )
    duplicates = sum(counts.values()) - len(counts)
    print(f"SIGKILL after {len(answered_before_kill)} answers: {duplicates} duplicates")
    # Re-delivered after the kill: what was answered but not yet committed.
    # The loop polls one batch at a time and commits after every turn, so
    # that is the batch in flight and perhaps the one before (8 measured);
    # the margin covers a slow machine where acks lag a few batches.
    batch = served.policy.student.batch.max_size
    assert duplicates <= 4 * batch, f"{duplicates} duplicates for batches of {batch}"
    assert exit_code == 0
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(e["event"] == "serving.drained" for e in events)
    assert any(e["event"] == "daemon.stopped" for e in events)


@pytest.mark.slow
def test_extraction_with_a_causal_lm_student_through_kafka(
    tmp_path: Path, broker: EmbeddedBroker, smollm2_dir: Path
) -> None:
    # The shipped extraction example, pointed at fresh topics and the test model.
    text = (REPO / "policies" / "us-address.yaml").read_text()
    task = f"address-{os.getpid()}-{time.monotonic_ns() % 100_000}"
    text = text.replace("us-address", task).replace("address-smollm2", smollm2_dir.name)
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir()
    (policies_dir / f"{task}.yaml").write_text(text)
    served = ServedTask(
        load_policy(policies_dir / f"{task}.yaml"), policies_dir, smollm2_dir.parent, tmp_path
    )
    addresses = [
        "1600 Pennsylvania Ave NW, Washington, DC 20500",
        "350 Fifth Avenue, New York, NY 10118",
        "1 Infinite Loop, Cupertino, CA 95014",
    ]
    lines = [request(f"a-{i}", task, a) for i, a in enumerate(addresses)]
    with running_daemon(served.settings(broker), {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        replay(daemon.kafka, lines, served.policy.traffic.requests_topic)
        responses = wait_for_ids(
            daemon.kafka,
            served.policy.traffic.responses_topic,
            {f"a-{i}" for i in range(3)},
            timeout_s=300,
        )
    schema = served.policy.output_schema
    assert schema is not None
    for response in responses:
        assert 0.0 <= response["confidence"] <= 1.0
        if "error" in response:
            # Invalid output is reported with the raw text, never passed on as valid.
            assert isinstance(response["output"], str)
        else:
            assert isinstance(response["output"], dict)
            assert set(response["output"]) <= set(schema["properties"])
            jsonschema.validate(response["output"], schema)


@pytest.mark.slow
def test_a_thousand_malformed_records_are_all_dead_lettered_and_none_answered(
    tmp_path: Path, broker: EmbeddedBroker, minilm_sentiment_dir: Path, reviews: list[str]
) -> None:
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir, max_input_chars=2000)
    task, traffic = served.policy.task, served.policy.traffic
    bad = fuzzed_records(task, 2000, 1000)
    good = [request(f"good-{i}", task, reviews[i]) for i in range(300)]
    lines = list(good)
    for i, record in enumerate(bad):  # spread through the good traffic
        lines.insert(random.Random(i).randrange(len(lines) + 1), record)
    with running_daemon(served.settings(broker), {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        replay(daemon.kafka, lines, traffic.requests_topic)
        wanted = {f"good-{i}" for i in range(300)}
        responses = wait_for_ids(daemon.kafka, traffic.responses_topic, wanted, timeout_s=300)
        dead = read_topic(
            daemon.kafka,
            traffic.dead_letter_topic,
            until=lambda recs: len(recs) >= len(bad),
            timeout_s=120,
        )
        # Serving goes on after the flood: a second batch of good requests is answered.
        later = [request(f"later-{i}", task, reviews[400 + i]) for i in range(50)]
        replay(daemon.kafka, later, traffic.requests_topic)
        wanted_later = {f"later-{i}" for i in range(50)}
        responses_later = wait_for_ids(daemon.kafka, traffic.responses_topic, wanted_later)
        stats = daemon.stats()[0].snapshot()
    answered = ids_answered(responses)
    assert set(answered) == wanted, "a malformed record was answered"
    assert all(n == 1 for n in answered.values())
    assert wanted_later <= set(ids_answered(responses_later))
    assert len(dead) == len(bad)
    # Each one is there, byte for byte (none is over the size a dead letter keeps).
    assert all(len(record) <= MAX_DEAD_LETTER_ORIGINAL_BYTES for record in bad)
    assert sorted(base64.b64decode(d["original_base64"]) for d in dead) == sorted(bad)
    reasons = Counter(d["reason"] for d in dead)
    assert set(reasons) <= {reason.value for reason in DeadLetterReason}
    for expected in (
        "invalid_json",
        "wrong_type",
        "unknown_task",
        "input_too_large",
        "missing_field",
    ):
        assert reasons[expected] > 0, reasons
    assert all(d["detail"] for d in dead)
    assert stats["dead_lettered"] == len(bad)

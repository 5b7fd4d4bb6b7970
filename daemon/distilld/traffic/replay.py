"""Replay recorded traffic into Kafka, and read a topic back (demo, benchmarks, tests)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import TopicPartition

from distilld.errors import DistilldError
from distilld.settings import KafkaConfig
from distilld.traffic.kafka import make_consumer, make_producer


@dataclass(frozen=True)
class ReplayResult:
    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def iter_jsonl_lines(path: Path) -> Iterator[bytes]:
    """Each non-empty line as raw bytes. Lines are sent as they are, malformed or not:
    replaying bad input is how the dead-letter path gets exercised."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DistilldError(f"cannot read replay file {path}: {exc.strerror}") from None
    with handle:
        for line in handle:
            line = line.rstrip(b"\r\n")
            if line:
                yield line


def _key_of(line: bytes) -> bytes | None:
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    request_id = doc.get("id") if isinstance(doc, dict) else None
    return request_id.encode("utf-8") if isinstance(request_id, str) else None


def replay(
    config: KafkaConfig,
    lines: Iterator[bytes] | list[bytes],
    topic: str,
    rate: float = 0.0,
    limit: int | None = None,
) -> ReplayResult:
    """Produce each line to ``topic`` at ``rate`` records/s (0: as fast as possible),
    keyed by its request id when it has one; returns after every record is acked."""
    producer = make_producer(config)
    sent = 0
    start = time.monotonic()
    try:
        for line in lines:
            if limit is not None and sent >= limit:
                break
            if rate > 0:
                # Pace against the start time, not the previous send, so the
                # average rate holds even when a send blocks for a while.
                delay = start + sent / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            producer.send(topic, value=line, key=_key_of(line))
            sent += 1
        producer.flush()
    finally:
        producer.close()
    return ReplayResult(sent=sent, seconds=time.monotonic() - start)


def read_topic(
    config: KafkaConfig,
    topic: str,
    *,
    until: Callable[[list[dict[str, Any]]], bool],
    timeout_s: float,
    decode: bool = True,
) -> list[dict[str, Any]]:
    """Read ``topic`` from the beginning (no consumer group) until ``until(records)``
    is true or the timeout passes. Each record is its JSON value plus ``_key``,
    ``_partition`` and ``_offset``."""
    consumer = make_consumer(config, group_id=None)
    out: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout_s
        partitions: list[TopicPartition] = []
        while not partitions and time.monotonic() < deadline:
            ids = consumer.partitions_for_topic(topic)
            partitions = [TopicPartition(topic, p) for p in sorted(ids or [])]
            if not partitions:
                time.sleep(0.2)
        if not partitions:
            return out
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        while time.monotonic() < deadline and not until(out):
            for records in consumer.poll(timeout_ms=200, max_records=5000).values():
                for record in records:
                    doc: dict[str, Any]
                    if decode:
                        try:
                            doc = json.loads(record.value)
                        except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
                            doc = {"_raw": record.value}
                    else:
                        doc = {"_raw": record.value}
                    doc["_key"] = record.key
                    doc["_partition"] = record.partition
                    doc["_offset"] = record.offset
                    out.append(doc)
    finally:
        consumer.close()
    return out

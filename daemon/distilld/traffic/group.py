"""The serving loop's side of its consumer group: hearing of rebalances, committing
offsets, measuring the lag per partition.

kafka-python consumers are not thread-safe: everything here runs on the loop
thread, except the rebalance listener's callbacks (kafka-python's I/O thread),
which only hand the news over.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from functools import partial
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from distilld.log import get_logger
from distilld.traffic.offsets import OffsetTracker


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Rebalance callbacks. kafka-python 3 runs them on its I/O thread, where no
    blocking client call is allowed: they only hand the news to the loop thread."""

    def __init__(self, revoked: queue.SimpleQueue[list[TopicPartition]], assigned: threading.Event):
        self._revoked = revoked
        self._assigned = assigned

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if revoked:
            self._revoked.put(list(revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        get_logger("serving").info(
            "serving.partitions_assigned", partitions=sorted(str(tp) for tp in assigned)
        )
        self._assigned.set()


def commit(
    consumer: KafkaConsumer,
    tracker: OffsetTracker[TopicPartition],
    *,
    force: bool,
    log: Any,
) -> bool:
    """Commit what is acknowledged; True when a commit was sent. Asynchronously unless
    ``force`` (draining, giving partitions away), so serving never waits on the broker;
    ``force`` also repeats the commit of partitions whose point did not move."""
    offsets = tracker.committable(include_unchanged=force)
    if not offsets:
        return False
    request = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
    try:
        if force:
            consumer.commit(request)
        else:
            consumer.commit_async(request, callback=partial(_on_async_commit, log))
    except (CommitFailedError, KafkaError) as exc:
        # A rebalance took the partitions; whoever owns them now re-reads
        # from the last committed offset (at-least-once, no loss).
        log.warning("serving.commit_failed", error=str(exc))
        return False
    tracker.mark_committed(offsets)
    return True


def _on_async_commit(log: Any, offsets: Any, response: Any) -> None:
    if isinstance(response, Exception):
        # The next commit carries a later (or the same) point for these partitions.
        log.warning("serving.commit_failed", error=str(response))


def measure_lag(
    consumer: KafkaConsumer, next_offset: Mapping[TopicPartition, int]
) -> dict[tuple[str, int], int]:
    """The lag of each assigned partition: the broker's high watermark known from the
    last fetch minus the offset after the last record polled (``next_offset``; no
    broker request; a partition is skipped until it returned a record and a fetch told
    its high watermark)."""
    lag: dict[tuple[str, int], int] = {}
    for partition in consumer.assignment():
        position = next_offset.get(partition)
        try:
            highwater = consumer.highwater(partition)
        except KafkaError:  # revoked since assignment() answered
            continue
        if position is not None and highwater is not None:
            lag[(partition.topic, partition.partition)] = max(0, highwater - position)
    return lag

"""Driving a running daemon in end-to-end tests: replay requests, wait for the
answers, wait for the shadow worker to compare them."""

from __future__ import annotations

import json
import time
from typing import Any

from distilld.demo.data import Row
from distilld.lifecycle import RunningDaemon
from distilld.settings import KafkaConfig
from distilld.traffic.replay import read_topic, replay
from support.kafka import ServedTask
from support.wait import wait_until


def request(request_id: str, task: str, text: str) -> bytes:
    return json.dumps({"id": request_id, "task": task, "input": text}).encode()


def answer_all(
    daemon: RunningDaemon, served: ServedTask, lines: list[bytes], ids: set[str]
) -> list[dict[str, Any]]:
    """Replay ``lines``; return the responses once every id in ``ids`` was answered."""
    traffic = served.policy.traffic
    replay(daemon.kafka, lines, traffic.requests_topic)
    responses = wait_for_ids(daemon.kafka, traffic.responses_topic, ids)
    assert ids <= {r.get("id") for r in responses}, "requests were not answered"
    return responses


# Teacher batches (16 requests) waiting beyond the worker's backlog are dropped by
# design when the teacher falls behind; traffic meant to be compared in full is
# replayed in chunks that fit.
COMPARED_CHUNK = 96


def compare_all(daemon: RunningDaemon, served: ServedTask, rows: list[Row]) -> dict[str, int]:
    """Replay ``rows`` chunk by chunk, each answered and compared before the next."""
    task = served.policy.task
    offered = daemon.monitoring.shadow.stats.snapshot()["offered"]
    for start in range(0, len(rows), COMPARED_CHUNK):
        chunk = rows[start : start + COMPARED_CHUNK]
        answer_all(
            daemon, served, [request(r.id, task, r.text) for r in chunk], {r.id for r in chunk}
        )
        offered += len(chunk)
        stats = settle(daemon, offered)
    return stats


def wait_for_ids(
    kafka: KafkaConfig, topic: str, ids: set[str], timeout_s: float = 240
) -> list[dict[str, Any]]:
    return read_topic(
        kafka, topic, until=lambda recs: ids <= {r.get("id") for r in recs}, timeout_s=timeout_s
    )


def settle(daemon: RunningDaemon, offered: int, timeout_s: float = 240) -> dict[str, int]:
    """Wait until the shadow worker was offered ``offered`` answers in all and handled
    them (reservoir written, sampled ones compared or dropped); returns its stats."""
    shadow = daemon.monitoring.shadow
    deadline = time.monotonic() + timeout_s
    wait_until(
        lambda: shadow.stats.snapshot()["offered"] >= offered,
        timeout_s,
        message=lambda: f"{offered} answers offered: {shadow.stats.snapshot()}",
    )
    idle = shadow.wait_idle(max(1.0, deadline - time.monotonic()))
    assert idle, f"the shadow worker did not finish: {shadow.stats.snapshot()}"
    return shadow.stats.snapshot()

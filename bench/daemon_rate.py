"""The daemon's answers/s through Kafka: the measurement both serving benchmarks share.

bench/serving.py (in-process transformers backend) and bench/serving_vllm.py
(vLLM backend) each set the daemon beside a direct call of the same backend;
the daemon's side is measured here, once, so that neither imports the other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

from distilld.lifecycle import RunningDaemon, running_daemon
from distilld.policy.model import Policy
from distilld.settings import Settings
from distilld.traffic.replay import replay


@contextmanager
def backlogged(policy: Policy, settings: Settings, texts: list[str]) -> Iterator[RunningDaemon]:
    """A daemon serving ``policy``, once it joined its consumer group, with ``texts``
    already waiting as a backlog on its requests topic."""
    lines = [
        json.dumps({"id": f"b-{i}", "task": policy.task, "input": t}).encode()
        for i, t in enumerate(texts)
    ]
    with running_daemon(settings, {policy.task: policy}) as daemon:
        replay(daemon.kafka, lines, policy.traffic.requests_topic)
        if not daemon.wait_ready(60):
            raise SystemExit("daemon did not join its consumer group")
        yield daemon


def wait_answered(daemon: RunningDaemon, count: int) -> None:
    """Until the daemon's (first) loop has answered ``count`` requests."""
    loop = daemon.loops[0]
    while loop.stats.answered < count:
        time.sleep(0.005)


def daemon_rate(policy: Policy, settings: Settings, texts: list[str]) -> float:
    """Answers/s of a daemon serving ``policy``: the requests go to the topic as a
    backlog first, then the clock runs from the consumer group join to the last
    acknowledged answer (the loop's own work: poll, batch, infer, produce, commit)."""
    with backlogged(policy, settings, texts) as daemon:
        started = time.perf_counter()
        wait_answered(daemon, len(texts))
        elapsed = time.perf_counter() - started
    return len(texts) / elapsed

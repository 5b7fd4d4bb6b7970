"""The daemon's answers/s through Kafka: the measurement both serving benchmarks share.

bench/serving.py (in-process transformers backend) and bench/serving_vllm.py
(vLLM backend) each set the daemon beside a direct call of the same backend;
the daemon's side is measured here, once, so that neither imports the other.
"""

from __future__ import annotations

import json
import time

from distilld.lifecycle import running_daemon
from distilld.policy.model import Policy
from distilld.settings import Settings
from distilld.traffic.replay import replay


def daemon_rate(policy: Policy, settings: Settings, texts: list[str]) -> float:
    """Answers/s of a daemon serving ``policy``: the requests go to the topic as a
    backlog first, then the clock runs from the consumer group join to the last
    acknowledged answer (the loop's own work: poll, batch, infer, produce, commit)."""
    lines = [
        json.dumps({"id": f"b-{i}", "task": policy.task, "input": t}).encode()
        for i, t in enumerate(texts)
    ]
    with running_daemon(settings, {policy.task: policy}) as daemon:
        replay(daemon.kafka, lines, policy.traffic.requests_topic)
        if not daemon.wait_ready(60):
            raise SystemExit("daemon did not join its consumer group")
        loop = daemon.loops[0]
        started = time.perf_counter()
        while loop.stats.answered < len(texts):
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
    return len(texts) / elapsed

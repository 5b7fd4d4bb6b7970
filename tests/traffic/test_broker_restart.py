"""The broker goes away and comes back while the daemon serves.

A broker of this test's own (the session's is shared), stopped and started
again on the same port. The embedded Tansu keeps nothing in memory across a
restart, so the test recreates the topics as a real cluster would still have
them; consumer-group offsets are gone too, which a real cluster would keep:
the daemon then starts from the earliest offsets of the new topics, which
hold only what was produced after the restart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from distilld.app import all_topics
from distilld.demo.data import load_rows
from distilld.lifecycle import running_daemon
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.kafka import ensure_topics
from distilld.traffic.replay import read_topic, replay
from support.kafka import write_sentiment_policy


def request(request_id: str, task: str, text: str) -> bytes:
    return json.dumps({"id": request_id, "task": task, "input": text}).encode()


@pytest.mark.slow
def test_the_daemon_reconnects_by_itself_after_the_broker_restarts(
    tmp_path: Path, minilm_sentiment_dir: Path
) -> None:
    reviews = [r.text for r in load_rows() if r.label is not None and r.text.strip()][:200]
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    try:
        served = write_sentiment_policy(tmp_path, minilm_sentiment_dir)
        task, traffic = served.policy.task, served.policy.traffic
        settings = served.settings(broker)
        with running_daemon(settings, {task: served.policy}) as daemon:
            assert daemon.wait_ready(60)
            before = {f"before-{i}" for i in range(50)}
            replay(
                daemon.kafka,
                [request(i, task, reviews[n]) for n, i in enumerate(sorted(before))],
                traffic.requests_topic,
            )
            read_topic(
                daemon.kafka,
                traffic.responses_topic,
                until=lambda recs: before <= {r.get("id") for r in recs},
                timeout_s=120,
            )

            broker.stop()
            time.sleep(5)  # the daemon's consumer and producers see the broker gone
            broker = EmbeddedBroker(port=broker.port, log_path=tmp_path / "tansu.log").start()
            ensure_topics(daemon.kafka, all_topics({task: served.policy}, settings))

            after = {f"after-{i}" for i in range(100)}
            lines = [request(i, task, reviews[50 + n]) for n, i in enumerate(sorted(after))]
            replay(daemon.kafka, lines, traffic.requests_topic)
            responses = read_topic(
                daemon.kafka,
                traffic.responses_topic,
                until=lambda recs: after <= {r.get("id") for r in recs},
                timeout_s=180,
            )
            assert not daemon.stop_event.is_set(), "the daemon stopped instead of reconnecting"
        answered = [r.get("id") for r in responses]
        assert after <= set(answered)
        assert all(r["output"] in ("fresh", "rotten") for r in responses)
    finally:
        broker.stop()

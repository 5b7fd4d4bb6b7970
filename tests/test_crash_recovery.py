"""SIGKILL five times during a 10,000-request run with a retraining in the middle.

A ``distilld run`` process (the session's Tansu broker, an untrained MiniLM
student that breaches at once, the gold-trained MiniLM teacher, retraining
with small sizes) is killed with SIGKILL at five points: while serving, right
after a monitoring check, while the teacher labels (retraining started),
while training (an epoch done), and right after a promotion. Each time a new
process starts on the same state directory and registry. At the end every
request id has a response and the registry has exactly one live version, the
one the last process serves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from distilld.demo.data import load_rows
from distilld.registry import ModelRegistry
from distilld.settings import Settings
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.replay import read_topic, replay
from support.kafka import TEST_SESSION_TIMEOUT_MS, sentiment_task, unique
from support.logs import json_lines
from support.wait import wait_until

TOTAL = 10_000
# Two speeds: most of the run fast, the end slowly, so that requests still
# arrive when the retrained candidate needs live comparisons for its shadow
# run, on a quiet machine (training done early) as on a busy one.
FAST, FAST_RATE = 8_500, 40.0  # about 3.5 minutes
SLOW_RATE = 10.0  # the last 1,500: 2.5 more minutes


def paced(lines: list[bytes]) -> Iterator[bytes]:
    start = time.monotonic()
    for i, line in enumerate(lines):
        due = i / FAST_RATE if i < FAST else FAST / FAST_RATE + (i - FAST) / SLOW_RATE
        delay = start + due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield line


def line_count(log: Path) -> int:
    return len(log.read_text(errors="replace").splitlines()) if log.exists() else 0


def wait_for_point(
    name: str, reached: Callable[[], bool], process: subprocess.Popen[bytes], log: Path
) -> None:
    """Wait until the daemon reached a point, failing if it exits first."""

    def check() -> bool:
        if reached():
            return True
        assert process.poll() is None, f"the daemon exited:\n{log.read_text()[-3000:]}"
        return False

    wait_until(check, 600, interval=0.2, message=lambda: f"{name}:\n{log.read_text()[-3000:]}")


def write_policy(tmp_path: Path, student: Path, teacher: Path) -> tuple[str, dict[str, Any]]:
    task = unique("crashed")
    document = {
        **sentiment_task(task),
        "student": {
            "model": str(student),
            "max_input_tokens": 32,
            "batch": {"max_size": 32, "max_wait_ms": 10},
        },
        "teacher": {"backend": "transformers", "model": str(teacher), "max_input_tokens": 48},
        "sampling": {"base_rate": 0.2},
        "monitors": {
            "interval_s": 5,
            "accuracy": {"threshold": 0.7, "min_samples": 50, "window": 200},
            "drift": {"enabled": False},
        },
        "retraining": {
            "size": {"min_examples": 250, "max_examples": 250},
            "filtering": {"min_teacher_confidence": 0.5},
            "training": {"epochs": 3, "batch_size": 16, "learning_rate": 3e-4, "max_tokens": 32},
            "gate": {"min_test_examples": 20, "margin": 0.4, "live_tolerance": 0.05},
            "shadow": {"share": 1.0, "min_comparisons": 20, "tolerance": 0.05},
            "rollback": {"min_comparisons": 100_000},
            "triggers": {"schedule": {"enabled": False}, "on_breach": {"cooldown_s": 1}},
        },
    }
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / f"{task}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return task, document


@pytest.mark.slow
@pytest.mark.timeout(2400)  # about 8 minutes alone on 2 cores; much longer on a busy machine
def test_five_sigkills_lose_no_request_and_leave_one_live_version(
    tmp_path: Path,
    broker: EmbeddedBroker,
    minilm_sentiment_dir: Path,
    trained_sentiment_dir: Path,
) -> None:
    task, document = write_policy(tmp_path, minilm_sentiment_dir, trained_sentiment_dir)
    state = tmp_path / "state"
    env = {
        **os.environ,
        "DISTILLD_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "DISTILLD_KAFKA_SESSION_TIMEOUT_MS": str(TEST_SESSION_TIMEOUT_MS),
        "DISTILLD_POLICIES_DIR": str(tmp_path / "policies"),
        "DISTILLD_MODELS_DIR": str(minilm_sentiment_dir.parent),
        "DISTILLD_STATE_DIR": str(state),
        "DISTILLD_RETRAIN_TICK_S": "0.5",
        "DISTILLD_POLICY_RELOAD_S": "0",
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "daemon.log"

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "distilld", "run"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    texts = [r.text for r in load_rows() if r.label is not None and r.text.strip()]
    lines = [
        json.dumps({"id": f"c-{i}", "task": task, "input": texts[i % len(texts)]}).encode()
        for i in range(TOTAL)
    ]
    kafka = Settings(kafka_bootstrap_servers=broker.bootstrap_servers).kafka()
    topics = document["traffic"]
    producer = threading.Thread(
        target=replay, args=(kafka, paced(lines), topics["requests_topic"]), daemon=True
    )

    def started_at(since: int) -> float | None:
        return next(
            (time.monotonic() for e in json_lines(log, since) if e["event"] == "daemon.started"),
            None,
        )

    # The five points, in order: each a test on the current process's log lines.
    serving_since: dict[str, float] = {}

    def serving(since: int) -> bool:
        if started_at(since) is None:
            return False
        first = serving_since.setdefault("t", time.monotonic())
        return time.monotonic() - first > 15

    def after(event: str) -> Callable[[int], bool]:
        return lambda since: any(e["event"] == event for e in json_lines(log, since))

    points: list[tuple[str, Callable[[int], bool]]] = [
        ("serving", serving),
        ("a check", after("monitor.checked")),
        ("labelling", after("retrain.started")),
        ("training", after("retrain.epoch")),
        ("promotion", after("retrain.promoted")),
    ]
    process = start()
    producer.start()
    try:
        killed_at: dict[str, int] = {}  # point -> log line of its kill
        for name, reached in points:
            since = line_count(log)
            wait_for_point(name, lambda: reached(since), process, log)  # noqa: B023 (used at once)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            with log.open("a") as out:
                out.write(f"--- SIGKILL at {name} ---\n")
            killed_at[name] = line_count(log)
            process = start()
        ids = {f"c-{i}" for i in range(TOTAL)}
        responses = read_topic(
            kafka,
            topics["responses_topic"],
            until=lambda recs: ids <= {r.get("id") for r in recs},
            timeout_s=900,
        )
        answered = {r.get("id") for r in responses}
        assert ids <= answered, f"{len(ids - answered)} requests never answered"
        registry = ModelRegistry(state / "registry" / task)
        live = [m.version for m in registry.list() if m.state == "live"]
        assert live == [registry.live_version()], [(m.version, m.state) for m in registry.list()]
        # Killed right after the promotion, the next process served the promoted version.
        up_to_kill = json_lines(log, stop=killed_at["promotion"])
        promoted = [e["version"] for e in up_to_kill if e["event"] == "retrain.promoted"]
        loaded = [
            e for e in json_lines(log, killed_at["promotion"]) if e["event"] == "student.loaded"
        ]
        assert loaded[0]["model_version"] == promoted[-1]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
        producer.join(timeout=5)

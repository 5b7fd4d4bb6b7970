"""Two daemon processes (replicas of one deployment: same policies, same state and
registry directories, one consumer group) never retrain the same task at once.

Both run the cron trigger every minute; when it fires in both, one takes the
registry's lock and trains, the other says the lock is held and does nothing.
Real parts: two ``distilld run`` processes, the session's Tansu broker, MiniLM
student and teacher, training from seed inputs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distilld.demo.data import load_rows
from distilld.traffic.broker import EmbeddedBroker
from support.kafka import TEST_SESSION_TIMEOUT_MS, sentiment_task, unique
from support.logs import Event, json_lines
from support.models import sentiment_training_rows
from support.wait import wait_until


@pytest.mark.slow
def test_two_replicas_never_retrain_one_task_at_once(
    tmp_path: Path,
    broker: EmbeddedBroker,
    minilm_sentiment_dir: Path,
    trained_sentiment_dir: Path,
) -> None:
    trained_on = {r.id for r in sentiment_training_rows()}
    seeds = [
        r.text
        for r in load_rows()
        if r.label is not None and 10 <= len(r.text) <= 120 and r.id not in trained_on
    ][:260]
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "seeds.txt").write_text("\n".join(seeds) + "\n")
    task = unique("replicated")
    document = {
        **sentiment_task(task),
        "student": {"model": str(minilm_sentiment_dir), "max_input_tokens": 48},
        "teacher": {
            "backend": "transformers",
            "model": str(trained_sentiment_dir),
            "max_input_tokens": 64,
        },
        "monitors": {"interval_s": 3600},
        "retraining": {
            "seed_files": ["seeds.txt"],
            "size": {"min_examples": 250, "max_examples": 250},
            # Long enough that the other replica's trigger finds it still running.
            "training": {"epochs": 20, "max_tokens": 48},
            "gate": {"min_test_examples": 20},
            "triggers": {"schedule": {"cron": "* * * * *"}},
        },
    }
    (policies / f"{task}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    env = {
        **os.environ,
        "DISTILLD_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "DISTILLD_KAFKA_SESSION_TIMEOUT_MS": str(TEST_SESSION_TIMEOUT_MS),
        "DISTILLD_POLICIES_DIR": str(policies),
        "DISTILLD_MODELS_DIR": str(minilm_sentiment_dir.parent),
        "DISTILLD_STATE_DIR": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
    }
    logs = [tmp_path / "replica-1.log", tmp_path / "replica-2.log"]
    processes = []
    for log in logs:
        with log.open("wb") as out:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "distilld", "run"],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        # The cron trigger fires at the start of each minute in both replicas.
        def fired_in_both() -> tuple[int, list[Event]] | None:
            seen = [e for log in logs for e in json_lines(log)]
            started = sum(e["event"] == "retrain.started" for e in seen)
            held = [
                e
                for e in seen
                if e["event"] == "retrain.skipped" and "lock held" in e.get("why", "")
            ]
            if started and held:
                return started, held
            for process, log in zip(processes, logs, strict=True):
                assert process.poll() is None, log.read_text()[-3000:]
            return None

        started, held = wait_until(
            fired_in_both,
            200,
            interval=0.5,
            message=lambda: (
                "a trigger in both replicas: "
                f"{[[e['event'] for e in json_lines(log)] for log in logs]}"
            ),
        )
        assert started == 1
        assert held[0]["trigger"] == "schedule"
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
    # The job stopped with its daemon: nothing was registered half-way.
    names = [e["event"] for log in logs for e in json_lines(log)]
    assert "retrain.promoted" not in names
    assert "retrain.cancelled" in names

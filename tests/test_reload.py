"""Policy hot reload: a valid change takes effect without a restart of the process,
an invalid file never replaces the policies in force.

The integration test serves a real MiniLM student through the session's Tansu
broker with ``lifecycle.serve`` (what ``distilld run`` calls), edits the policy file
while it runs and checks the behaviour the policy controls (the input size
limit).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from distilld.lifecycle import RunningDaemon, serve
from distilld.policy.load import load_policies
from distilld.policy.model import Policy
from distilld.policy.watch import PolicyWatcher, fingerprint
from distilld.settings import KafkaConfig, Settings
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.replay import read_topic, replay
from support.kafka import TEST_SESSION_TIMEOUT_MS, write_sentiment_policy
from support.logs import Event, named
from support.wait import wait_until

# How long a daemon may take to start, restart or refuse a reload on a busy machine.
RESTART_S = 120


@contextmanager
def reloading_daemon(
    settings: Settings, policy: Policy, policies_dir: Path
) -> Iterator[tuple[list[RunningDaemon], threading.Thread]]:
    """``lifecycle.serve`` on a thread, as ``distilld run`` serves (watching
    ``policies_dir``), ready once its first daemon is; yields the daemons it started
    (one more per accepted reload) and the thread; stops it and checks it ended."""
    started: list[RunningDaemon] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=serve,
        args=(settings, {policy.task: policy}, stop, policies_dir, started.append),
        daemon=True,
    )
    thread.start()
    try:
        wait_until(
            lambda: len(started) == 1 and started[0].wait_ready(1), RESTART_S, message="first start"
        )
        yield started, thread
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()


def test_the_watcher_accepts_valid_changes_and_alerts_invalid_ones(
    tmp_path: Path, minilm_sentiment_dir: Path, logs: list[Event]
) -> None:
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir)
    path = next(served.policies_dir.glob("*.yaml"))
    original = path.read_text()
    watcher = PolicyWatcher(served.policies_dir, load_policies(served.policies_dir))

    assert watcher.poll() is None  # nothing changed
    path.write_text(original + "# a comment only\n")
    assert watcher.poll() is None  # changed file, same policies

    path.write_text(original.replace("max_size: 8", "max_size: -1"))
    assert watcher.poll() is None
    rejected = named(logs, "policy.reload_rejected")
    assert len(rejected) == 1
    assert rejected[0]["alert"] is True
    assert any("student.batch.max_size" in p for p in rejected[0]["problems"])
    assert watcher.poll() is None  # the same invalid content is not alerted again
    assert len(named(logs, "policy.reload_rejected")) == 1

    path.write_text(original.replace("max_size: 8", "max_size: 4"))
    reloaded = watcher.poll()
    assert reloaded is not None
    assert reloaded[served.policy.task].student.batch.max_size == 4
    assert watcher.current is reloaded


def test_fingerprint_follows_names_and_contents(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("x")
    first = fingerprint(tmp_path)
    (tmp_path / "notes.txt").write_text("ignored")
    assert fingerprint(tmp_path) == first
    (tmp_path / "a.yaml").write_text("y")
    assert fingerprint(tmp_path) != first
    assert fingerprint(tmp_path / "missing") == ""


@pytest.mark.slow
def test_a_running_daemon_applies_a_valid_policy_change_and_keeps_serving_on_an_invalid_one(
    tmp_path: Path,
    broker: EmbeddedBroker,
    minilm_sentiment_dir: Path,
    logs: list[Event],
) -> None:
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir, max_input_chars=2000)
    task = served.policy.task
    traffic = served.policy.traffic
    path = next(served.policies_dir.glob("*.yaml"))
    settings = served.settings(broker).model_copy(update={"policy_reload_s": 0.3})
    with reloading_daemon(settings, served.policy, served.policies_dir) as (started, _thread):
        kafka = started[0].kafka
        long_text = "a fine film " * 20  # 240 characters

        def ask(request_id: str) -> None:
            line = json.dumps({"id": request_id, "task": task, "input": long_text}).encode()
            replay(kafka, [line], traffic.requests_topic)

        ask("before")
        answered = read_topic(
            kafka,
            traffic.responses_topic,
            until=lambda rs: any(r.get("id") == "before" for r in rs),
            timeout_s=60,
        )
        assert any(r["id"] == "before" for r in answered)

        # A valid change: inputs over 100 characters are now refused.
        path.write_text(path.read_text().replace("max_input_chars: 2000", "max_input_chars: 100"))
        wait_until(
            lambda: len(started) == 2 and started[1].wait_ready(1), RESTART_S, message="restart"
        )
        ask("after")
        dead = read_topic(
            kafka,
            traffic.dead_letter_topic,
            until=lambda rs: any(r.get("id") == "after" for r in rs),
            timeout_s=60,
        )
        letter = next(r for r in dead if r.get("id") == "after")
        assert letter["reason"] == "input_too_large"

        # An invalid change is refused; the policies in force keep serving.
        path.write_text(path.read_text().replace("kind: classification", "kind: poetry"))
        wait_until(
            lambda: named(logs, "policy.reload_rejected"), RESTART_S, message="the rejection"
        )
        line = json.dumps({"id": "still", "task": task, "input": "short and sweet"}).encode()
        replay(kafka, [line], traffic.requests_topic)
        answered = read_topic(
            kafka,
            traffic.responses_topic,
            until=lambda rs: any(r.get("id") == "still" for r in rs),
            timeout_s=60,
        )
        assert any(r["id"] == "still" for r in answered)
        assert len(started) == 2


def test_the_watcher_refuses_a_valid_set_that_cannot_start_and_can_revert(
    tmp_path: Path, logs: list[Event]
) -> None:
    served = write_sentiment_policy(tmp_path, tmp_path / "models" / "student")
    path = next(served.policies_dir.glob("*.yaml"))
    original = path.read_text()
    in_force = load_policies(served.policies_dir)
    verdicts: list[list[str]] = [["task x: teacher.model 'gone' does not exist"]]
    watcher = PolicyWatcher(served.policies_dir, in_force, check=lambda _: verdicts[0])

    path.write_text(original.replace("max_size: 8", "max_size: 4"))
    assert watcher.poll() is None  # valid, but it cannot start here
    rejected = named(logs, "policy.reload_rejected")
    assert len(rejected) == 1
    assert rejected[0]["problems"] == verdicts[0]
    assert watcher.current is in_force
    assert watcher.poll() is None  # the same files are not tried (or alerted) again
    assert len(named(logs, "policy.reload_rejected")) == 1

    verdicts[0] = []
    path.write_text(original.replace("max_size: 8", "max_size: 2"))
    reloaded = watcher.poll()
    assert reloaded is not None and watcher.current is reloaded

    # The caller could not start it after all and started the previous set again.
    watcher.revert(in_force, "ModelLoadError: could not load the student")
    rejected = named(logs, "policy.reload_rejected")
    assert len(rejected) == 2
    assert rejected[1]["problems"] == ["ModelLoadError: could not load the student"]
    assert watcher.current is in_force
    assert watcher.poll() is None


def linked_models(tmp_path: Path, minilm_sentiment_dir: Path) -> Path:
    """A models directory of this test: the cached MiniLM (hard links, no copy) and a
    directory that looks like a checkpoint but does not load."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(minilm_sentiment_dir, models / minilm_sentiment_dir.name, copy_function=os.link)
    broken = models / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    return models


def answered(kafka: KafkaConfig, task: str, topic: str, requests: str, request_id: str) -> None:
    line = json.dumps({"id": request_id, "task": task, "input": "a fine film"}).encode()
    replay(kafka, [line], requests)
    seen = read_topic(
        kafka, topic, until=lambda rs: any(r.get("id") == request_id for r in rs), timeout_s=60
    )
    assert any(r.get("id") == request_id for r in seen)


@pytest.mark.slow
def test_a_reload_that_cannot_start_never_stops_the_daemon(
    tmp_path: Path,
    broker: EmbeddedBroker,
    minilm_sentiment_dir: Path,
    logs: list[Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DISTILLD_TEST_RELOAD_UNSET_KEY", raising=False)
    models = linked_models(tmp_path, minilm_sentiment_dir)
    served = write_sentiment_policy(tmp_path, models / minilm_sentiment_dir.name)
    task = served.policy.task
    traffic = served.policy.traffic
    path = next(served.policies_dir.glob("*.yaml"))
    original = path.read_text()
    settings = served.settings(broker).model_copy(update={"policy_reload_s": 0.3})
    with reloading_daemon(settings, served.policy, served.policies_dir) as (started, thread):
        kafka = started[0].kafka
        answered(kafka, task, traffic.responses_topic, traffic.requests_topic, "first")

        def rejected_for(edited: str, reason: str, request_id: str) -> list[Event]:
            seen = len(logs)
            path.write_text(edited)
            rejections = wait_until(
                lambda: named(logs[seen:], "policy.reload_rejected"),
                RESTART_S,
                message=f"the rejection ({reason})",
            )
            assert len(rejections) == 1
            assert reason in " ".join(str(p) for p in rejections[0]["problems"])
            assert thread.is_alive()
            latest = started[-1]
            wait_until(lambda: latest.wait_ready(1), RESTART_S, message="serving")
            answered(
                latest.kafka, task, traffic.responses_topic, traffic.requests_topic, request_id
            )
            return rejections

        # (a) a teacher whose model directory does not exist: refused before the drain.
        rejected_for(
            original + "teacher:\n  backend: transformers\n  model: gone\n",
            "(teacher.model 'gone') does not exist",
            "after-missing-teacher",
        )
        # (b) a teacher whose API key variable is unset: refused before the drain.
        rejected_for(
            original
            + "teacher:\n  backend: openai\n  base_url: http://127.0.0.1:9/v1\n  model: judge\n"
            "  api_key_env: DISTILLD_TEST_RELOAD_UNSET_KEY\n"
            '  prompt: "Answer fresh or rotten.\\nText: {input}"\n',
            "DISTILLD_TEST_RELOAD_UNSET_KEY",
            "after-unset-key",
        )
        assert len(started) == 1  # neither drained the daemon in force
        # (c) a student that looks like a checkpoint but does not load: it only fails
        # after the drain, and the previous policies are started again.
        rejected_for(
            original.replace(f"model: {minilm_sentiment_dir.name}", "model: broken"),
            "ModelLoadError",
            "after-broken-student",
        )
        assert len(started) == 2
        assert started[1].kafka.bootstrap_servers == kafka.bootstrap_servers


@pytest.mark.slow
def test_a_reload_keeps_the_embedded_broker_and_what_it_holds(
    tmp_path: Path, minilm_sentiment_dir: Path
) -> None:
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir)
    task = served.policy.task
    traffic = served.policy.traffic
    path = next(served.policies_dir.glob("*.yaml"))
    settings = Settings(
        kafka_session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        policies_dir=served.policies_dir,
        models_dir=served.models_dir,
        state_dir=served.state_dir,
        policy_reload_s=0.3,
    )
    assert settings.kafka_bootstrap_servers is None  # the daemon starts its own broker
    with reloading_daemon(settings, served.policy, served.policies_dir) as (started, _thread):
        kafka = started[0].kafka
        answered(kafka, task, traffic.responses_topic, traffic.requests_topic, "before")

        path.write_text(path.read_text().replace("max_size: 8", "max_size: 4"))
        wait_until(
            lambda: len(started) == 2 and started[1].wait_ready(1), RESTART_S, message="restart"
        )
        assert started[1].kafka.bootstrap_servers == kafka.bootstrap_servers
        answered(kafka, task, traffic.responses_topic, traffic.requests_topic, "after")
        # The broker kept its records and the group its offsets: "before" is still on
        # the responses topic and was not answered a second time.
        responses = read_topic(
            kafka,
            traffic.responses_topic,
            until=lambda rs: any(r.get("id") == "after" for r in rs),
            timeout_s=60,
        )
        assert [r["id"] for r in responses].count("before") == 1

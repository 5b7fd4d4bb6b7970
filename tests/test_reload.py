"""Policy hot reload: a valid change takes effect without a restart of the process,
an invalid file never replaces the policies in force.

The integration test serves a real MiniLM student through the session's Tansu
broker with ``app.serve`` (what ``distilld run`` calls), edits the policy file
while it runs and checks the behaviour the policy controls (the input size
limit).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from distilld.app import RunningDaemon, serve
from distilld.log import configure_logging
from distilld.policy.load import load_policies
from distilld.policy.watch import PolicyWatcher, fingerprint
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.replay import read_topic, replay
from support.kafka import write_sentiment_policy


def logged(output: str, event: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def test_the_watcher_accepts_valid_changes_and_alerts_invalid_ones(
    tmp_path: Path, minilm_sentiment_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir)
    path = next(served.policies_dir.glob("*.yaml"))
    original = path.read_text()
    watcher = PolicyWatcher(served.policies_dir, load_policies(served.policies_dir))

    assert watcher.poll() is None  # nothing changed
    path.write_text(original + "# a comment only\n")
    assert watcher.poll() is None  # changed file, same policies

    path.write_text(original.replace("max_size: 8", "max_size: -1"))
    assert watcher.poll() is None
    rejected = logged(capsys.readouterr().out, "policy.reload_rejected")
    assert len(rejected) == 1
    assert rejected[0]["alert"] is True
    assert any("student.batch.max_size" in p for p in rejected[0]["problems"])  # type: ignore[union-attr]
    assert watcher.poll() is None  # the same invalid content is not alerted again
    assert logged(capsys.readouterr().out, "policy.reload_rejected") == []

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
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "json")
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir, max_input_chars=2000)
    task = served.policy.task
    traffic = served.policy.traffic
    path = next(served.policies_dir.glob("*.yaml"))
    settings = served.settings(broker).model_copy(update={"policy_reload_s": 0.3})
    started: list[RunningDaemon] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=serve,
        args=(settings, {task: served.policy}, stop, served.policies_dir, started.append),
        daemon=True,
    )
    thread.start()
    try:
        wait_for(lambda: len(started) == 1 and started[0].wait_ready(1), "first start")
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
        wait_for(lambda: len(started) == 2 and started[1].wait_ready(1), "restart")
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
        wait_for(lambda: logged(capsys.readouterr().out, "policy.reload_rejected"), "rejection")
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
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()


def wait_for(condition: object, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.2)

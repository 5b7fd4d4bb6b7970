"""The command line as an operator uses it: exit codes, messages, the embedded broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distilld.cli import main
from distilld.settings import KafkaConfig
from distilld.traffic.kafka import ensure_topics
from distilld.traffic.replay import read_topic
from support.kafka import unique, write_sentiment_policy
from support.logs import json_lines
from support.wait import wait_until

REPO = Path(__file__).resolve().parents[1]


def test_policy_validate_accepts_the_shipped_examples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Away from the daemon's machine: its models directory is not here.
    monkeypatch.setenv("DISTILLD_MODELS_DIR", str(tmp_path / "not-here"))
    assert main(["policy", "validate", str(REPO / "policies")]) == 0
    out = capsys.readouterr().out
    assert "ok: " in out
    assert "task 'rotten-tomatoes'" in out
    assert "task 'us-address'" in out
    assert "not checked here: task 'rotten-tomatoes': student.model" in out
    assert "does not exist here" in out


def test_policy_validate_checks_models_and_secrets_where_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    student = models / "student"
    student.mkdir(parents=True)
    (student / "config.json").write_text("{}")
    (student / "model.safetensors").write_bytes(b"only looked at, never loaded")
    served = write_sentiment_policy(tmp_path, student)
    path = next(served.policies_dir.glob("*.yaml"))
    original = path.read_text()
    monkeypatch.setenv("DISTILLD_MODELS_DIR", str(models))
    monkeypatch.delenv("DISTILLD_TEST_CLI_KEY", raising=False)

    assert main(["policy", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"ok: {path}: task {served.policy.task!r}" in out
    assert "not checked here:" in out and "loads as a sequence-classification student" in out

    path.write_text(original + "teacher:\n  backend: transformers\n  model: gone\n")
    assert main(["policy", "validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert "ok: " not in captured.out
    assert f"{path}: task {served.policy.task!r}: model directory" in captured.err
    assert "(teacher.model 'gone') does not exist" in captured.err

    path.write_text(
        original + "teacher:\n  backend: openai\n  base_url: http://127.0.0.1:9/v1\n"
        "  model: judge\n  api_key_env: DISTILLD_TEST_CLI_KEY\n"
        '  prompt: "Answer fresh or rotten.\\nText: {input}"\n'
    )
    assert main(["policy", "validate", str(served.policies_dir)]) == 2
    captured = capsys.readouterr()
    assert "DISTILLD_TEST_CLI_KEY" in captured.err
    monkeypatch.setenv("DISTILLD_TEST_CLI_KEY", "a key")
    assert main(["policy", "validate", str(served.policies_dir)]) == 0
    out = capsys.readouterr().out
    assert "the teacher endpoint http://127.0.0.1:9/v1 is reached only by the running" in out


def test_policy_validate_names_file_and_field_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = (REPO / "policies" / "rotten-tomatoes.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.replace("max_size: 8", "max_size: -4"))
    assert main(["policy", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: student.batch.max_size" in err
    assert "Traceback" not in err


def test_policy_validate_warns_when_min_examples_cannot_fill_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = (REPO / "policies" / "rotten-tomatoes.yaml").read_text()
    small = tmp_path / "small.yaml"
    small.write_text(
        good.replace("min_examples: 1000", "min_examples: 300").replace(
            "gate: {margin: 0.15,", "gate: {min_test_examples: 40, margin: 0.15,"
        )
    )
    assert main(["policy", "validate", str(small)]) == 0  # a warning, not an error
    out = capsys.readouterr().out
    assert "warning:" in out and "min_examples is 300" in out
    assert "the first attempt selects 400 inputs instead" in out


def test_policy_schema_is_json_with_the_policy_sections(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"task", "kind", "labels", "traffic", "student"} <= set(schema["properties"])


def test_run_with_an_invalid_settings_value_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_SESSION_TIMEOUT_MS", "soon")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "DISTILLD_KAFKA_SESSION_TIMEOUT_MS" in err
    assert "soon" in err


def test_replay_produces_every_line_as_is(
    tmp_path: Path, kafka_config: KafkaConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = unique("replay")
    ensure_topics(kafka_config, [topic])
    lines = [json.dumps({"id": f"r-{i}", "task": "t", "input": "x"}) for i in range(20)]
    lines.append("{broken")
    path = tmp_path / "traffic.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    code = main(
        [
            "replay",
            str(path),
            "--topic",
            topic,
            "--bootstrap-servers",
            kafka_config.bootstrap_servers,
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sent"] == 21
    records = read_topic(kafka_config, topic, until=lambda r: len(r) >= 21, timeout_s=30)
    assert sorted(r["_key"] for r in records if "id" in r) == sorted(
        f"r-{i}".encode() for i in range(20)
    )
    assert [r["_raw"] for r in records if "_raw" in r] == [b"{broken"]


def test_replay_of_a_missing_file_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "replay",
            "/nonexistent/traffic.jsonl",
            "--topic",
            "t",
            "--bootstrap-servers",
            "127.0.0.1:1",
        ]
    )
    assert code == 1
    assert "/nonexistent/traffic.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_run_without_bootstrap_servers_starts_and_stops_an_embedded_broker(
    tmp_path: Path, minilm_sentiment_dir: Path
) -> None:
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLD_")}
    env.update(
        {
            "DISTILLD_POLICIES_DIR": str(served.policies_dir),
            "DISTILLD_MODELS_DIR": str(served.models_dir),
            "DISTILLD_STATE_DIR": str(served.state_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "distilld", "run"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def daemon_started() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            return any(e["event"] == "daemon.started" for e in json_lines(log))

        wait_until(daemon_started, 120, interval=0.2, message=lambda: log.read_text()[-3000:])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    events = json_lines(log)
    names = [e["event"] for e in events]
    started = next(e for e in events if e["event"] == "broker.embedded_started")
    assert started["bootstrap_servers"].startswith("127.0.0.1:")
    assert "embedded" in started["note"]
    assert names.index("broker.embedded_started") < names.index("daemon.started")
    assert "broker.embedded_stopped" in names
    # The Tansu process is gone with the daemon.
    pid = started["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _registry_with_two_versions(state_dir: Path) -> None:
    from distilld.registry import Manifest, ModelRegistry

    registry = ModelRegistry(state_dir / "registry" / "reviews")
    for name in ("first", "second"):
        model = state_dir / f"model-{name}"
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        registry.register(model, Manifest(version=name, metrics={"gate_summary": f"{name} ok"}))
    registry.promote("first")


def test_versions_promote_and_rollback_change_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from distilld.registry import ModelRegistry

    monkeypatch.setenv("DISTILLD_STATE_DIR", str(tmp_path))
    _registry_with_two_versions(tmp_path)

    assert main(["versions", "reviews"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["*", "first", "live", "first", "ok"]
    assert listing[1].split() == ["second", "candidate", "second", "ok"]

    assert main(["promote", "reviews", "second"]) == 0
    assert "second is live" in capsys.readouterr().out
    assert ModelRegistry(tmp_path / "registry" / "reviews").live_version() == "second"

    assert main(["rollback", "reviews"]) == 0
    assert "first is live" in capsys.readouterr().out
    registry = ModelRegistry(tmp_path / "registry" / "reviews")
    assert registry.live_version() == "first"
    assert registry.get("second").state == "rolled_back"

    assert main(["versions", "reviews", "--json"]) == 0
    manifests = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [m["state"] for m in manifests] == ["live", "rolled_back"]


def test_registry_commands_explain_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISTILLD_STATE_DIR", str(tmp_path))

    assert main(["versions", "nowhere"]) == 2
    assert "no model registry for task 'nowhere'" in capsys.readouterr().err

    _registry_with_two_versions(tmp_path)
    assert main(["promote", "reviews", "third"]) == 1
    err = capsys.readouterr().err
    assert "third" in err and "Traceback" not in err
    assert main(["rollback", "reviews"]) == 1
    assert "no previous version to roll back to" in capsys.readouterr().err


def test_retrain_leaves_a_request_only_for_a_task_that_retrains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISTILLD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DISTILLD_POLICIES_DIR", str(REPO / "policies"))

    # The shipped extraction example has no retraining section (commented out).
    assert main(["retrain", "us-address"]) == 2
    assert "does not retrain" in capsys.readouterr().err
    assert not (tmp_path / "state" / "requests" / "us-address.retrain").exists()
    assert main(["retrain", "unknown"]) == 2
    assert "no policy for task 'unknown'" in capsys.readouterr().err
    # The quick-start policy retrains.
    assert main(["retrain", "rotten-tomatoes"]) == 0
    assert "retraining of 'rotten-tomatoes' requested" in capsys.readouterr().out
    assert (tmp_path / "state" / "requests" / "rotten-tomatoes.retrain").is_file()

"""Retraining through the real daemon: breach -> retrain -> shadow -> promote -> rollback,
and a cold start.

Real parts throughout: the session's Tansu broker, the daemon as ``distilld run``
builds it, an in-process MiniLM student whose head was never trained (it cannot do
the task, so accuracy breaches), the MiniLM teacher fine-tuned once on gold labels
(``trained_sentiment_dir``), real training, the gate, the registry on disk. Checks
run on demand (``scheduler.run_now``); the manager ticks every half second.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from distilld.demo.data import Row, load_rows
from distilld.lifecycle import RunningDaemon, running_daemon
from distilld.monitoring.evaluate import Status
from distilld.policy.load import load_policy
from distilld.registry import ModelRegistry
from distilld.report import write_report
from distilld.retrain.requests import request_retraining
from distilld.serving.swap import COLD_START_VERSION
from distilld.settings import Settings
from distilld.store.base import AlertEvent
from distilld.traffic.broker import EmbeddedBroker
from support.daemon import answer_all, compare_all, request, settle
from support.kafka import TEST_SESSION_TIMEOUT_MS, ServedTask, sentiment_task, unique
from support.models import sentiment_training_rows
from support.wait import wait_until

HOUR_S = 3600
JOB_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def reviews() -> list[Row]:
    trained_on = {r.id for r in sentiment_training_rows()}
    rows = [
        r
        for r in load_rows()
        if r.label is not None and 10 <= len(r.text) <= 120 and r.id not in trained_on
    ]
    random.Random(11).shuffle(rows)
    return rows


def retraining_section(**changes: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "size": {"min_examples": 300, "max_examples": 300},
        "filtering": {"min_teacher_confidence": 0.5},
        "training": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-4, "max_tokens": 48},
        "gate": {"min_test_examples": 20, "margin": 0.4, "live_tolerance": 0.05},
        "shadow": {"share": 1.0, "min_comparisons": 40, "tolerance": 0.05},
        "rollback": {"min_comparisons": 1000},  # no automatic rollback within these tests
        "triggers": {"schedule": {"enabled": False}, "on_breach": {"cooldown_s": HOUR_S}},
        "cold_start": {"retry_s": 1},
    }
    section.update(changes)
    return section


def write_policy(
    tmp_path: Path, student: Path | None, teacher: Path, retraining: dict[str, Any]
) -> ServedTask:
    task = unique("retrained")
    student_section: dict[str, Any] = {
        "architecture": "sequence-classification",
        "max_input_tokens": 48,
        "batch": {"max_size": 16, "max_wait_ms": 10},
    }
    if student is not None:
        student_section["model"] = str(student)
    document = {
        **sentiment_task(task),
        "student": student_section,
        "teacher": {"backend": "transformers", "model": str(teacher), "max_input_tokens": 64},
        "sampling": {"base_rate": 1.0},
        "monitors": {
            "interval_s": HOUR_S,
            "accuracy": {"threshold": 0.8, "min_samples": 50, "window": 200},
            "drift": {"enabled": False},
        },
        "retraining": retraining,
    }
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir(parents=True, exist_ok=True)
    path = policies_dir / f"{task}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    state_dir = tmp_path / "state"
    state_dir.mkdir(exist_ok=True)
    return ServedTask(load_policy(path), policies_dir, teacher.parent, state_dir)


def settings_for(served: ServedTask, broker: EmbeddedBroker) -> Settings:
    return Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        kafka_session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        policies_dir=served.policies_dir,
        models_dir=served.models_dir,
        state_dir=served.state_dir,
        retrain_tick_s=0.5,
    )


def alerts_of(daemon: RunningDaemon, task: str) -> list[AlertEvent]:
    return list(reversed(daemon.monitoring.store.last_alerts(task, limit=200)))


def kinds(daemon: RunningDaemon, task: str) -> list[str]:
    return [a.kind for a in alerts_of(daemon, task)]


def served_version(daemon: RunningDaemon, task: str) -> str:
    assert daemon.students is not None
    return daemon.students.backends[task].model_version


@pytest.mark.slow
def test_a_breach_retrains_shadows_promotes_and_the_operator_can_roll_back(
    tmp_path: Path,
    broker: EmbeddedBroker,
    minilm_sentiment_dir: Path,
    trained_sentiment_dir: Path,
    reviews: list[Row],
) -> None:
    served = write_policy(
        tmp_path, minilm_sentiment_dir, trained_sentiment_dir, retraining_section()
    )
    task = served.policy.task
    settings = settings_for(served, broker)
    with running_daemon(settings, {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        assert daemon.retraining is not None
        registry = ModelRegistry(settings.registry_root / task)
        adopted = registry.live_version()
        # The policy's student became the registry's first live version.
        assert adopted == minilm_sentiment_dir.name == served_version(daemon, task)

        # 1. Traffic the untrained student answers badly: accuracy breaches.
        compare_all(daemon, served, reviews[:300])
        outcome = daemon.monitoring.scheduler.run_now(task)
        statuses = {v.metric: v.status for v in outcome.verdicts}  # type: ignore[attr-defined]
        assert statuses["agreement"] is Status.breach

        # 2. The breach started a retraining; a request by hand meanwhile is refused.
        wait_until(
            lambda: "retrain.started" in kinds(daemon, task),
            30,
            interval=0.2,
            message="retrain.started",
        )
        request_retraining(settings.requests_dir, task)
        wait_until(
            lambda: "retrain.requested" in kinds(daemon, task),
            30,
            interval=0.2,
            message="request picked up",
        )
        requested = next(a for a in alerts_of(daemon, task) if a.kind == "retrain.requested")
        assert requested.payload["started"] is False
        # A second breach within the cooldown starts nothing either.
        daemon.monitoring.scheduler.run_now(task)
        wait_until(
            lambda: (
                "retrain.shadow_started" in kinds(daemon, task)
                or "retrain.failed" in kinds(daemon, task)
                or "retrain.gate_failed" in kinds(daemon, task)
            ),
            JOB_TIMEOUT_S,
            interval=0.2,
            message="the candidate in shadow",
        )
        assert kinds(daemon, task).count("retrain.started") == 1
        assert "retrain.shadow_started" in kinds(daemon, task), alerts_of(daemon, task)[-3:]
        candidate = next(m for m in registry.list() if m.state == "shadow").version
        assert served_version(daemon, task) == adopted  # not yet

        # 3. Shadow: the candidate answers the compared requests beside the live student.
        before = [r.id for r in reviews[300:400]]
        compare_all(daemon, served, reviews[300:400])
        wait_until(
            lambda: registry.live_version() == candidate, 60, interval=0.2, message="promotion"
        )
        wait_until(
            lambda: served_version(daemon, task) == candidate,
            60,
            interval=0.2,
            message="the switch",
        )
        promoted = next(a for a in alerts_of(daemon, task) if a.kind == "retrain.promoted")
        assert promoted.payload["version"] == candidate
        assert promoted.payload["previous"] == adopted
        assert "shadow" in promoted.payload["why"]
        assert registry.get(adopted).state == "retired"
        assert registry.get(candidate).parent == adopted
        shadowed = [
            c
            for c in daemon.monitoring.store.last_comparisons(task, 5000)
            if c.model_version == candidate and c.request_id in set(before)
        ]
        assert len(shadowed) >= 40

        # 4. New requests are answered by the new version, none lost.
        after = reviews[400:440]
        responses = answer_all(
            daemon, served, [request(r.id, task, r.text) for r in after], {r.id for r in after}
        )
        latest = {r["id"]: r for r in responses if r["id"] in {x.id for x in after}}
        assert {r["model_version"] for r in latest.values()} == {candidate}

        # The report shows it all: curves per version, the promotion, the gate.
        page = write_report(
            {task: served.policy},
            daemon.monitoring.store,
            {task: registry},
            settings.reports_dir,
            tmp_path / "report.html",
        ).read_text()
        assert page.count("<svg") == 1  # agreement; drift is off in this policy
        assert "no data yet" in page
        assert f"&#9632; {candidate}" in page and f"&#9632; {adopted}" in page
        assert "retrain.promoted" in page
        assert "primary_vs_teacher" in page  # the live version's gate table

        # 5. `distilld rollback` (the registry change it makes): the daemon follows.
        registry.rollback()
        wait_until(
            lambda: served_version(daemon, task) == adopted,
            60,
            interval=0.2,
            message="the rollback switch",
        )
        assert registry.get(candidate).state == "rolled_back"
        settle(daemon, daemon.monitoring.shadow.stats.snapshot()["offered"])

    # 6. A promotion written while the daemon was down is served at the next start.
    registry.promote(candidate)
    with running_daemon(settings, {task: served.policy}) as daemon:
        assert served_version(daemon, task) == candidate


@pytest.mark.slow
def test_a_cold_start_serves_with_the_teacher_then_promotes_the_first_student(
    tmp_path: Path,
    broker: EmbeddedBroker,
    minilm_sentiment_dir: Path,
    trained_sentiment_dir: Path,
    reviews: list[Row],
) -> None:
    served = write_policy(
        tmp_path,
        None,
        trained_sentiment_dir,
        retraining_section(base_model=str(minilm_sentiment_dir)),
    )
    task = served.policy.task
    settings = settings_for(served, broker)
    with running_daemon(settings, {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        assert served_version(daemon, task) == COLD_START_VERSION
        first = reviews[:240]
        responses = answer_all(
            daemon, served, [request(r.id, task, r.text) for r in first], {r.id for r in first}
        )
        # The teacher answered while there was no student.
        assert {r["model_version"] for r in responses} == {COLD_START_VERSION}
        settle(daemon, len(first))
        registry = ModelRegistry(settings.registry_root / task)
        wait_until(
            lambda: (
                registry.live_version() is not None or "retrain.gate_failed" in kinds(daemon, task)
            ),
            JOB_TIMEOUT_S,
            interval=0.2,
            message="the first student",
        )
        version = registry.live_version()
        assert version is not None, alerts_of(daemon, task)[-3:]
        wait_until(
            lambda: served_version(daemon, task) == version, 60, interval=0.2, message="the switch"
        )
        started = next(a for a in alerts_of(daemon, task) if a.kind == "retrain.started")
        assert started.payload["trigger"] == "cold_start"
        promoted = next(a for a in alerts_of(daemon, task) if a.kind == "retrain.promoted")
        assert promoted.payload["previous"] == COLD_START_VERSION
        later = reviews[240:260]
        responses = answer_all(
            daemon, served, [request(r.id, task, r.text) for r in later], {r.id for r in later}
        )
        assert {r["model_version"] for r in responses if r["id"] in {x.id for x in later}} == {
            version
        }

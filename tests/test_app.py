"""Wiring decisions of app.py that are not covered through a running daemon."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from distilld.monitoring.config import MonitorsConfig
from distilld.monitoring.features import REFERENCE_FILE, fit_reference, save_reference
from distilld.monitoring.measure import run_check
from distilld.monitoring.references import LiveReference, ReferencePins, drift_reference
from distilld.registry import Manifest, ModelRegistry
from distilld.store.base import TrafficSample
from distilld.store.sqlite import SqliteStore
from support.logs import Event, named


def test_an_unreadable_drift_reference_is_reported_with_an_alert(
    tmp_path: Path, logs: list[Event]
) -> None:
    (tmp_path / REFERENCE_FILE).write_text("{not json")
    assert drift_reference(tmp_path) is None
    unreadable = named(logs, "monitoring.reference_unreadable")
    assert len(unreadable) == 1
    assert unreadable[0]["alert"] is True
    assert REFERENCE_FILE in unreadable[0]["path"]


def test_a_pinned_reference_stands_in_for_an_unreadable_one_of_the_model(
    tmp_path: Path, logs: list[Event]
) -> None:
    (tmp_path / REFERENCE_FILE).write_text("{not json")
    pinned = tmp_path / "state" / REFERENCE_FILE
    texts = [f"a short review number {i} about a film" for i in range(30)]
    save_reference(replace(fit_reference(texts), origin="pinned"), pinned)
    loaded = drift_reference(tmp_path, pinned)
    assert loaded is not None and loaded.origin == "pinned" and len(loaded.frame) == 30
    assert len(named(logs, "monitoring.reference_unreadable")) == 1


def test_a_saved_drift_reference_is_loaded_and_a_missing_one_is_reported(
    tmp_path: Path, logs: list[Event]
) -> None:
    texts = [f"a short review number {i} about a film" for i in range(40)]
    save_reference(fit_reference(texts), tmp_path / REFERENCE_FILE)
    loaded = drift_reference(tmp_path)
    assert loaded is not None
    assert len(loaded.frame) == 40
    assert drift_reference(tmp_path / "elsewhere") is None
    assert len(named(logs, "monitoring.no_saved_reference")) == 1
    assert drift_reference(None) is None


def _rows(version: str, count: int) -> list[TrafficSample]:
    return [
        TrafficSample(
            task="reviews",
            input_text=f"a short review number {i} about a film, {'good' if i % 2 else 'bad'}",
            metadata={},
            student_output="fresh" if i % 2 else "rotten",
            student_confidence=0.9,
            request_id=f"{version}-{i}",
            model_version=version,
        )
        for i in range(count)
    ]


MONITORS = MonitorsConfig.model_validate(
    {
        "accuracy": {"enabled": False},
        "drift": {"window": 50, "min_samples": 20, "reference_size": 40},
    }
)


def test_a_registry_version_without_a_reference_gets_one_pinned_and_saved_with_it(
    tmp_path: Path, logs: list[Event]
) -> None:
    # An adopted student: in the registry, without a drift reference.
    registry = ModelRegistry(tmp_path / "registry")
    model_dir = tmp_path / "adopted"
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"w")
    version = registry.register(model_dir, Manifest(task="reviews"), copy=True)
    registry.promote(version)
    pins = ReferencePins("reviews", tmp_path / "state", registry)
    live = LiveReference(lambda: registry.path(version), lambda: version, pins)
    store = SqliteStore(tmp_path / "state.db")
    try:
        assert live() is None
        store.add_traffic(_rows(version, 30))
        early = run_check(
            "reviews",
            kind="classification",
            monitors=MONITORS,
            store=store,
            reference=live(),
            reports_dir=None,
            model_version=version,
            pin=live.pin,
        )
        assert early.drift is None and early.drift_note is not None
        assert "(30 so far)" in early.drift_note
        store.add_traffic(_rows(version, 30))
        outcome = run_check(
            "reviews",
            kind="classification",
            monitors=MONITORS,
            store=store,
            reference=live(),
            reports_dir=None,
            model_version=version,
            pin=live.pin,
        )
    finally:
        store.close()
    assert outcome.reference_source == "pinned" and outcome.drift is not None

    # Saved with the version, as a trained version's reference is, and said so.
    saved = registry.path(version) / REFERENCE_FILE
    assert saved.is_file()
    assert registry.get(version).reference_distribution == REFERENCE_FILE
    (pinned,) = named(logs, "drift.reference_pinned")
    assert (pinned["task"], pinned["version"], pinned["rows"]) == ("reviews", version, 40)
    assert pinned["path"] == str(saved)
    # The daemon keeps it, and a restarted one finds it.
    kept = live()
    assert kept is not None and kept.origin == "pinned"
    again = LiveReference(lambda: registry.path(version), lambda: version, pins)()
    assert again is not None and again.origin == "pinned" and len(again.frame) == 40


def test_a_version_outside_a_registry_gets_its_pinned_reference_under_the_state_dir(
    tmp_path: Path,
) -> None:
    # An external vLLM student: no model directory here, a served name as its version.
    pins = ReferencePins("reviews", tmp_path / "state")
    live = LiveReference(lambda: None, lambda: "org/served-model", pins)
    store = SqliteStore(tmp_path / "state.db")
    try:
        store.add_traffic(_rows("org/served-model", 60))
        outcome = run_check(
            "reviews",
            kind="classification",
            monitors=MONITORS,
            store=store,
            reference=live(),
            reports_dir=None,
            model_version="org/served-model",
            pin=live.pin,
        )
    finally:
        store.close()
    assert outcome.reference_source == "pinned"
    path = pins.outside("org/served-model")
    assert path.is_file() and path.is_relative_to(tmp_path / "state" / "drift-references")
    found = LiveReference(lambda: None, lambda: "org/served-model", pins)()
    assert found is not None and found.origin == "pinned"
    # Another version does not inherit it.
    assert LiveReference(lambda: None, lambda: "v2", pins)() is None


def test_an_external_vllm_student_needs_no_model_files_here(tmp_path: Path) -> None:
    import threading
    from contextlib import ExitStack

    from distilld.policy.model import Policy
    from distilld.settings import Settings
    from distilld.students import load_students

    policy = Policy.model_validate(
        {
            "task": "reviews",
            "kind": "classification",
            "labels": ["fresh", "rotten"],
            "prompt": "Review: {input}",
            "traffic": {
                "requests_topic": "r.requests",
                "responses_topic": "r.responses",
                "dead_letter_topic": "r.dead-letter",
            },
            "student": {
                "backend": "vllm",
                "architecture": "causal-lm",
                "model": "served-elsewhere",  # a name on the server, not a directory here
                "vllm": {"base_url": "http://127.0.0.1:9"},
            },
        }
    )
    settings = Settings(models_dir=tmp_path / "models", state_dir=tmp_path / "state")
    with ExitStack() as stack:
        students = load_students(
            {"reviews": policy}, settings, stack, threading.Event(), registries={}, teachers={}
        )
        assert students.backends["reviews"].model_version == "served-elsewhere"
        assert students.vllm["reviews"].server is None


def test_monitoring_applies_retention_at_start_and_schedules_it(tmp_path: Path) -> None:
    import time
    from contextlib import ExitStack

    from distilld.app import start_monitoring
    from distilld.monitoring.measure import _report_dir
    from distilld.policy.model import Policy
    from distilld.serving.fake import FakeStudent
    from distilld.settings import Settings
    from distilld.students import Students
    from support.records import comparison

    policy = Policy.model_validate(
        {
            "task": "reviews",
            "kind": "classification",
            "labels": ["fresh", "rotten"],
            "traffic": {
                "requests_topic": "r.requests",
                "responses_topic": "r.responses",
                "dead_letter_topic": "r.dead-letter",
            },
            "student": {"model": "student"},
        }
    )
    settings = Settings(
        models_dir=tmp_path / "models",
        state_dir=tmp_path / "state",
        retention_reports_per_task=2,
        retention_days=1.0,
    )
    now = time.time()
    for i in range(5):  # five checks' report folders, a minute apart
        _report_dir(settings.reports_dir, "reviews", now - 3600 + 60 * i).mkdir(parents=True)
    store = SqliteStore(settings.store_path)
    old = [comparison(f"old{i}", "v1", 1.0, at=now - 2 * 86_400) for i in range(1200)]
    store.add_comparisons([*old, comparison("new", "v1", 1.0, at=now)])
    store.close()

    student = FakeStudent(["fresh", "rotten"])
    students = Students(backends={"reviews": student}, slots={}, vllm={})
    with ExitStack() as stack:
        monitoring = start_monitoring({"reviews": policy}, settings, stack, students, {}, {}, None)
        assert len(list((settings.reports_dir / "reviews").iterdir())) == 2
        # The newest 1,000 rows stay whatever their age (the alert restore reads them).
        assert monitoring.store.count_comparisons("reviews") == 1000
        jobs = {job.id for job in monitoring.scheduler._scheduler.get_jobs()}
        assert "housekeeping:retention" in jobs

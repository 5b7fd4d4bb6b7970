"""Retention: report folders, failed-gate reports and store rows stay bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distilld.alerts import DEFAULT_RESTORE_LIMIT
from distilld.monitoring.measure import _report_dir
from distilld.policy.model import Policy
from distilld.retention import (
    DAY_S,
    Retention,
    RetentionConfig,
    oldest_beyond,
    prune_failed_gates,
    prune_reports,
    rows_cutoff,
    rows_floor,
)
from distilld.retrain.gate_report import FAILED_GATES_DIR
from distilld.store.base import AlertEvent, CheckResult
from distilld.store.sqlite import SqliteStore
from support.logs import Event, named
from support.records import comparison

NOW = 1_800_000_000.0


def policy(window: int = 50, **retraining: Any) -> Policy:
    document: dict[str, Any] = {
        "task": "reviews",
        "kind": "classification",
        "labels": ["fresh", "rotten"],
        "traffic": {
            "requests_topic": "r.requests",
            "responses_topic": "r.responses",
            "dead_letter_topic": "r.dead-letter",
        },
        "student": {"model": "student"},
        "teacher": {"backend": "transformers", "model": "teacher"},
        "monitors": {"accuracy": {"window": window, "min_samples": 10}},
    }
    if retraining:
        document["retraining"] = retraining
    return Policy.model_validate(document)


def make_reports(reports_dir: Path, task: str, count: int) -> list[Path]:
    """``count`` report folders of ``task``, one per check a minute apart, oldest first."""
    made = []
    for i in range(count):
        folder = _report_dir(reports_dir, task, NOW + 60 * i)
        folder.mkdir(parents=True)
        (folder / "drift.html").write_text("<html>" + "x" * 100 + "</html>")
        made.append(folder)
    return made


def test_oldest_beyond_keeps_the_newest_names() -> None:
    assert oldest_beyond(["c", "a", "d", "b"], 2) == ["a", "b"]
    assert oldest_beyond(["a"], 2) == []
    assert oldest_beyond(["a", "b"], 0) == ["a", "b"]


def test_reports_beyond_the_limit_are_deleted_oldest_first(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reviews = make_reports(reports, "reviews", 7)
    addresses = make_reports(reports, "addresses", 2)
    notes = reports / "reviews" / "notes"  # not a check's folder: never touched
    notes.mkdir()

    deleted = prune_reports(reports, keep=3)

    assert deleted == reviews[:4]
    assert [p for p in reviews if p.exists()] == reviews[4:]
    assert all(p.exists() for p in addresses)
    assert notes.is_dir()
    assert prune_reports(reports, keep=3) == []  # a second sweep finds nothing more
    assert prune_reports(tmp_path / "missing", keep=3) == []


def test_failed_gate_reports_beyond_the_limit_are_deleted_in_pairs(tmp_path: Path) -> None:
    gates = tmp_path / "retraining" / "reviews" / FAILED_GATES_DIR
    gates.mkdir(parents=True)
    stamps = [f"20270101T0000{i:02d}" for i in range(5)]
    for stamp in stamps:
        (gates / f"gate-{stamp}.json").write_text("{}")
        (gates / f"gate-{stamp}.html").write_text("<html></html>")
    (tmp_path / "retraining" / "reviews" / "job-1234").mkdir()  # scratch: not ours

    deleted = prune_failed_gates(tmp_path / "retraining", keep=2)

    assert len(deleted) == 6
    assert sorted(p.name for p in gates.iterdir()) == [
        f"gate-{stamps[3]}.html",
        f"gate-{stamps[3]}.json",
        f"gate-{stamps[4]}.html",
        f"gate-{stamps[4]}.json",
    ]
    assert (tmp_path / "retraining" / "reviews" / "job-1234").is_dir()


def test_the_cutoff_waits_for_the_longest_shadow_run_or_rollback_watch() -> None:
    plain = policy()
    assert rows_cutoff(NOW, 30 * DAY_S, [plain]) == NOW - 30 * DAY_S
    long_watch = policy(
        shadow={"max_duration_s": 40 * DAY_S}, rollback={"watch_window_s": 45 * DAY_S}
    )
    assert rows_cutoff(NOW, 30 * DAY_S, [plain, long_watch]) == NOW - 45 * DAY_S
    assert rows_cutoff(NOW, 60 * DAY_S, [long_watch]) == NOW - 60 * DAY_S


def test_the_floor_covers_the_accuracy_window_and_the_alert_restore() -> None:
    assert rows_floor([]) == DEFAULT_RESTORE_LIMIT
    assert rows_floor([policy(window=50)]) == DEFAULT_RESTORE_LIMIT
    assert rows_floor([policy(window=50), policy(window=5000)]) == 5000


def test_a_sweep_bounds_reports_gates_and_rows(tmp_path: Path, logs: list[Event]) -> None:
    store = SqliteStore(tmp_path / "distilld.sqlite")
    reports = tmp_path / "reports"
    make_reports(reports, "reviews", 4)
    old, new = NOW - 31 * DAY_S, NOW - 29 * DAY_S
    # 1,500 old comparisons, then 10 new: the old ones beyond the newest 1,000 go.
    store.add_comparisons([comparison(f"o{i}", "v1", 1.0, at=old) for i in range(1500)])
    store.add_comparisons([comparison(f"n{i}", "v1", 1.0, at=new) for i in range(10)])
    store.add_check(CheckResult(task="reviews", summary={}, created_at=old))
    retention = Retention(
        RetentionConfig(max_age_s=30 * DAY_S, reports_per_task=2),
        store,
        reports,
        tmp_path / "retraining",
        [policy(window=50)],
        clock=lambda: NOW,
    )

    outcome = retention.run()

    assert outcome["report_dirs"] == 2
    assert outcome["comparisons_rows"] == 1500 + 10 - DEFAULT_RESTORE_LIMIT
    assert outcome["checks_rows"] == 0  # the task's only check: within the floor
    assert store.count_comparisons("reviews") == DEFAULT_RESTORE_LIMIT
    assert [c.request_id for c in store.last_comparisons("reviews", 10)] == [
        f"n{i}" for i in range(10)
    ]
    assert [line["deleted"] for line in named(logs, "retention.swept")] == [outcome]
    store.close()


def test_a_sweep_that_cannot_reach_the_store_logs_and_goes_on(
    tmp_path: Path, logs: list[Event]
) -> None:
    store = SqliteStore(tmp_path / "distilld.sqlite")
    store.add_alert(AlertEvent(task="reviews", kind="breach", metric="agreement", created_at=1.0))
    store.close()  # every store call now raises StoreError
    reports = tmp_path / "reports"
    make_reports(reports, "reviews", 3)
    retention = Retention(
        RetentionConfig(reports_per_task=1), store, reports, tmp_path / "retraining", []
    )

    outcome = retention.run()  # does not raise

    assert outcome["report_dirs"] == 2  # the reports were still pruned
    failed = named(logs, "retention.failed")
    assert len(failed) == 1 and failed[0]["what"] == "store"
    assert "closed" in failed[0]["error"]


def test_retention_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="reports_per_task >= 1"):
        RetentionConfig(reports_per_task=0)

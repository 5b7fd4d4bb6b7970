"""The closed-loop demo's parts that decide what it shows: its data, its policy, its summary.

The demo run itself (teacher, first student, the daemon retraining by itself)
is the quick start; ``bench/loop.py`` runs it and prints its figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distilld.demo.data import LoopData, Row, load_rows, loop_data
from distilld.demo.run import (
    DEMO_OVERRIDES,
    Milestones,
    loop_summary,
    merged,
    render_summary,
    write_demo_policy,
)
from distilld.errors import ConfigError
from distilld.policy.load import load_policy
from distilld.store.base import AlertEvent
from support.records import comparison

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_data_parts_are_disjoint_and_the_population_shifts() -> None:
    data = loop_data(
        load_rows(),
        teacher_size=500,
        student_size=300,
        before_size=400,
        after_size=600,
        before_fresh_share=0.9,
        after_fresh_share=0.15,
    )
    parts = [data.teacher_train, data.student_train, data.before, data.after]
    ids = [r.id for part in parts for r in part]
    assert len(ids) == len(set(ids)) == 500 + 300 + 400 + 600

    def fresh_share(rows: list[Row]) -> float:
        return sum(r.label == "fresh" for r in rows) / len(rows)

    assert fresh_share(data.student_train) == pytest.approx(0.9, abs=0.01)
    assert fresh_share(data.before) == pytest.approx(0.9, abs=0.01)
    assert fresh_share(data.after) == pytest.approx(0.15, abs=0.01)
    assert all(r.label is not None for part in parts for r in part)  # no plot summaries


def test_the_demo_policy_is_the_example_policy_with_shorter_intervals(tmp_path: Path) -> None:
    source = REPO / "policies" / "rotten-tomatoes.yaml"
    example = load_policy(source)
    demo = load_policy(write_demo_policy(source, tmp_path))
    assert demo.task == example.task and demo.teacher == example.teacher
    assert demo.monitors.interval_s == DEMO_OVERRIDES["monitors"]["interval_s"]
    assert demo.monitors.interval_s < example.monitors.interval_s
    assert demo.retraining is not None and example.retraining is not None
    # Overrides change what they name and keep the rest.
    assert demo.retraining.training.learning_rate == 2e-4
    assert demo.retraining.training.distill == example.retraining.training.distill
    assert demo.retraining.training.epochs == example.retraining.training.epochs
    assert demo.retraining.shadow.min_comparisons == 100


def test_a_demo_policy_without_a_teacher_is_refused_with_what_to_do(tmp_path: Path) -> None:
    source = tmp_path / "rotten-tomatoes.yaml"
    source.write_text("task: rotten-tomatoes\nkind: classification\n")
    with pytest.raises(ConfigError, match="no teacher and no retraining section"):
        write_demo_policy(source, tmp_path / "out")


def test_merged_applies_nested_changes_key_by_key() -> None:
    base = {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "f": 4}
    assert merged(base, {"a": {"c": {"d": 9}}, "g": 5}) == {
        "a": {"b": 1, "c": {"d": 9, "e": 3}},
        "f": 4,
        "g": 5,
    }
    assert base["a"] == {"b": 1, "c": {"d": 2, "e": 3}}  # the base is not modified


def test_the_summary_splits_agreement_and_accuracy_by_phase_and_counts_losses() -> None:
    before = [Row("b1", "good", "fresh"), Row("b2", "fine", "fresh")]
    after = [Row("a1", "bad", "rotten"), Row("a2", "awful", "rotten"), Row("a3", "dull", "rotten")]
    data = LoopData(teacher_train=[], student_train=[], before=before, after=after)
    milestones = Milestones(shifted_at=100.0)
    milestones.update(
        [
            AlertEvent("t", "breach", "agreement", value=0.5, threshold=0.8, created_at=90),
            AlertEvent("t", "breach", "agreement", value=0.6, threshold=0.8, created_at=130),
            AlertEvent(
                "t", "retrain.started", "retraining", payload={"trigger": "breach"}, created_at=131
            ),
            AlertEvent(
                "t",
                "retrain.candidate_ready",
                "retraining",
                payload={"train_examples": 400, "seconds": 60.0, "gate": "passed"},
                created_at=200,
            ),
            AlertEvent(
                "t", "retrain.promoted", "retraining", payload={"version": "v0002"}, created_at=250
            ),
        ]
    )
    comparisons = [
        comparison("v0001-50", "v0001", 1.0, at=50),
        comparison("v0001-60", "v0001", 1.0, at=60),
        comparison("v0001-120", "v0001", 0.0, at=120),
        comparison("v0001-140", "v0001", 1.0, at=140),
        comparison("v0002-150", "v0002", 0.0, at=150),  # the candidate in shadow: no phase
        comparison("v0002-260", "v0002", 1.0, at=260),
    ]
    responses = [
        {"id": "b1", "output": "fresh", "model_version": "v0001"},
        {"id": "b2", "output": "rotten", "model_version": "v0001"},
        {"id": "a1", "output": "fresh", "model_version": "v0001"},
        {"id": "a2", "output": "rotten", "model_version": "v0002"},
        {"id": "a2", "output": "rotten", "model_version": "v0002"},  # a duplicate
    ]
    summary = loop_summary(
        data=data,
        sent_ids={"b1", "b2", "a1", "a2", "a3"},
        responses=responses,
        dead=[{"reason": "not_json"}],
        comparisons=comparisons,
        milestones=milestones,
        first_version="v0001",
        seconds=300.0,
        outcome="recovered",
        gate=None,
    )
    assert summary["agreement"]["before"] == {"value": 1.0, "n": 2}
    assert summary["agreement"]["during"] == {"value": 0.5, "n": 2}
    assert summary["agreement"]["after"] == {"value": 1.0, "n": 1}
    assert summary["gold_accuracy"]["before"] == {"value": 0.5, "n": 2}
    assert summary["gold_accuracy"]["during"] == {"value": 0.0, "n": 1}
    assert summary["gold_accuracy"]["after"] == {"value": 1.0, "n": 1}
    assert summary["requests"] == {
        "sent": 5,
        "answered": 4,
        "unanswered": 1,
        "duplicates": 1,
        "dead_lettered": 1,
        "dead_letter_reasons": ["not_json"],
    }
    # The breach before the shift is not a detection of it.
    assert summary["detected"]["seconds_after_shift"] == 30.0
    assert summary["retraining"]["started_s_after_shift"] == 31.0
    assert summary["retraining"]["train_examples"] == 400
    assert summary["retraining"]["promoted_version"] == "v0002"
    assert summary["retraining"]["promoted_s_after_shift"] == 150.0
    text = render_summary(summary, Path("summary.json"))
    assert "30.0 s after the shift: agreement 0.600 < 0.8" in text
    assert "v0002 (was v0001)" in text

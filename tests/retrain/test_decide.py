"""The retraining manager's pure decisions: triggers, shadow verdict, rollback verdict."""

from __future__ import annotations

import pytest

from distilld.retrain.config import (
    RetrainingConfig,
    RollbackConfig,
    ShadowConfig,
)
from distilld.retrain.decide import may_start, rollback_verdict, shadow_verdict
from distilld.retrain.manager import shadow_pairs, watch_scores
from support.records import comparison

# --------------------------------------------------------------------------- triggers


def config(**changes: object) -> RetrainingConfig:
    return RetrainingConfig.model_validate(changes)


def test_a_breach_starts_a_retraining_once_the_cooldown_is_over() -> None:
    cfg = config(triggers={"on_breach": {"cooldown_s": 600}})

    early = may_start("breach", cfg, running=False, last_started_at=1000.0, now=1599.0)
    late = may_start("breach", cfg, running=False, last_started_at=1000.0, now=1600.0)
    never = may_start("breach", cfg, running=False, last_started_at=None, now=5.0)

    assert not early.start
    assert "cooldown" in early.why and "1 s left" in early.why
    assert late.start and never.start


def test_one_retraining_per_task_whatever_the_trigger() -> None:
    for trigger in ("breach", "schedule", "manual", "cold_start"):
        decision = may_start(trigger, config(), running=True, last_started_at=None, now=0.0)
        assert not decision.start
        assert "already running" in decision.why


def test_a_candidate_in_shadow_holds_breaches_and_the_schedule_but_not_a_request() -> None:
    cfg = config()
    for trigger in ("breach", "schedule"):
        decision = may_start(
            trigger, cfg, running=False, last_started_at=None, now=0.0, in_shadow="v0003"
        )
        assert not decision.start
        assert "v0003 is in its shadow run" in decision.why
    manual = may_start(
        "manual", cfg, running=False, last_started_at=None, now=0.0, in_shadow="v0003"
    )
    assert manual.start


def test_the_cooldown_applies_to_breaches_only() -> None:
    cfg = config(triggers={"on_breach": {"cooldown_s": 600}})

    for trigger in ("schedule", "manual", "cold_start"):
        assert may_start(trigger, cfg, running=False, last_started_at=1000.0, now=1001.0).start


@pytest.mark.parametrize(
    ("trigger", "changes", "why"),
    [
        ("breach", {"enabled": False}, "retraining is disabled"),
        ("breach", {"triggers": {"on_breach": {"enabled": False}}}, "on breach is disabled"),
        ("schedule", {"triggers": {"schedule": {"enabled": False}}}, "scheduled retraining"),
        ("manual", {"triggers": {"manual": {"enabled": False}}}, "by hand is disabled"),
    ],
)
def test_disabled_triggers_say_so(trigger: str, changes: dict[str, object], why: str) -> None:
    decision = may_start(
        trigger,  # type: ignore[arg-type]
        config(**changes),
        running=False,
        last_started_at=None,
        now=0.0,
    )

    assert not decision.start
    assert why in decision.why


# --------------------------------------------------------------------------- shadow


SHADOW = ShadowConfig(min_comparisons=4, tolerance=0.1, max_duration_s=100)


def test_shadow_waits_for_enough_comparisons() -> None:
    verdict = shadow_verdict([(1.0, 1.0)] * 3, SHADOW, elapsed_s=10)

    assert verdict.decision == "wait"
    assert verdict.n == 3
    assert verdict.why == "3 of 4 comparisons"


def test_shadow_gives_up_after_max_duration() -> None:
    verdict = shadow_verdict([(1.0, 1.0)] * 3, SHADOW, elapsed_s=100)

    assert verdict.decision == "reject"
    assert "only 3 of the 4" in verdict.why


def test_shadow_promotes_a_candidate_within_tolerance_of_the_live_student() -> None:
    # Candidate 0.75 against live 1.0: more than the 0.1 tolerance behind.
    pairs = [(1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (0.0, 1.0)]
    verdict = shadow_verdict(pairs, SHADOW, elapsed_s=10)

    assert verdict.decision == "reject"  # 0.75 < 1.0 - 0.1
    assert verdict.candidate == pytest.approx(0.75) and verdict.live == pytest.approx(1.0)

    close = [(1.0, 1.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0)]
    verdict = shadow_verdict(close, SHADOW, elapsed_s=10)
    assert verdict.decision == "promote"
    assert "candidate 0.7500 vs live 0.7500 on 4" in verdict.why


def test_shadow_pairs_join_the_two_versions_on_the_request() -> None:
    comparisons = [
        comparison("a", "live", 1.0),
        comparison("a", "cand", 0.0),
        comparison("b", "cand", 1.0),  # the live answer of b was not compared
        comparison("c", "live", 0.0),
        comparison("c", "cand", 1.0),
        comparison("d", "cand", None),  # no usable teacher answer
        comparison("d", "live", 1.0),
    ]

    assert sorted(shadow_pairs(comparisons, "cand", "live")) == [(0.0, 1.0), (1.0, 0.0)]


# --------------------------------------------------------------------------- rollback


ROLLBACK = RollbackConfig(min_comparisons=3, tolerance=0.05, watch_window_s=100)


def test_a_worse_version_is_rolled_back_within_the_window() -> None:
    verdict = rollback_verdict([1.0, 0.0, 0.0], previous=0.9, config=ROLLBACK, elapsed_s=50)

    assert verdict.decision == "rollback"
    assert verdict.new == pytest.approx(1 / 3)
    assert "below the previous version's 0.9000" in verdict.why


def test_a_version_as_good_as_the_previous_one_is_kept_watching() -> None:
    verdict = rollback_verdict([1.0, 1.0, 0.8], previous=0.9, config=ROLLBACK, elapsed_s=50)

    assert verdict.decision == "watch"


@pytest.mark.parametrize(
    ("scores", "previous", "elapsed", "config", "decision", "why"),
    [
        ([0.0] * 3, 0.9, 50, ROLLBACK, "watch", "2 of 3"),
        ([0.0] * 3, 0.9, 101, ROLLBACK, "keep", "watch window"),
        ([0.0] * 3, None, 50, ROLLBACK, "keep", "no comparisons"),
        ([0.0] * 3, 0.9, 50, RollbackConfig(enabled=False), "keep", "disabled"),
    ],
)
def test_rollback_needs_evidence_time_and_a_reference(
    scores: list[float],
    previous: float | None,
    elapsed: float,
    config: RollbackConfig,
    decision: str,
    why: str,
) -> None:
    if why == "2 of 3":
        scores = scores[:2]
    verdict = rollback_verdict(scores, previous, config, elapsed)

    assert verdict.decision == decision
    assert why in verdict.why


def test_watch_scores_split_before_and_after_the_promotion() -> None:
    comparisons = [
        comparison("1", "old", 1.0, at=10),
        comparison("2", "old", 0.0, at=20),
        comparison("3", "old", 1.0, at=30),
        comparison("4", "new", 0.0, at=40),
        comparison("5", "new", 1.0, at=50),
        comparison("6", "new", 1.0, at=5),  # before the promotion: a shadow answer
    ]

    new, previous = watch_scores(comparisons, "new", "old", since=35, window=2)

    assert sorted(new) == [0.0, 1.0]
    assert previous == pytest.approx(0.5)  # the last two of "old": 0.0 and 1.0

"""The retraining manager's pure decisions: triggers, shadow verdict, rollback verdict,
job sizes, the wait after a failed attempt, stale breaches."""

from __future__ import annotations

import json

import pytest

from distilld.retrain.config import (
    RetrainingConfig,
    RollbackConfig,
    ShadowConfig,
)
from distilld.retrain.decide import (
    RetryPlan,
    breach_is_current,
    first_size,
    inputs_needed,
    may_start,
    plan_retry,
    retry_ready,
    rollback_verdict,
    shadow_verdict,
    size_warnings,
)
from distilld.retrain.rollout import watch_scores
from distilld.retrain.shadow_run import shadow_pairs
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


# --------------------------------------------------------------------------- sizes


def test_the_inputs_needed_count_the_share_the_filter_drops() -> None:
    cfg = config(gate={"min_test_examples": 25})

    assert inputs_needed(cfg) == 250  # 25 held out at split.test 0.1
    # Seen on a running daemon: the filter dropped 78 of 319 answers, so 319 inputs held
    # out 24 examples; the count after filtering must reach 250.
    needed = inputs_needed(cfg, drop_rate=78 / 319)
    assert needed == 331
    assert round(needed * (1 - 78 / 319)) * 0.1 >= 25
    assert round(319 * (1 - 78 / 319) * 0.1) < 25  # what the old minimum let through


def test_the_first_attempt_starts_at_what_the_gate_needs_within_the_maximum() -> None:
    # 300 inputs hold out 30 < 40: the first attempt selects 400, not min_examples.
    cfg = config(size={"min_examples": 300, "max_examples": 5000}, gate={"min_test_examples": 40})
    assert first_size(cfg, "classification", 2) == 400
    assert first_size(cfg, "classification", 2, drop_rate=0.2) == 500
    roomy = config(size={"min_examples": 1000}, gate={"min_test_examples": 40})
    assert first_size(roomy, "classification", 2) == 1000
    capped = config(size={"min_examples": 300, "max_examples": 350}, gate={"min_test_examples": 40})
    assert first_size(capped, "classification", 2) == 350


def test_size_warnings_name_the_size_the_gate_needs() -> None:
    low = config(size={"min_examples": 300, "max_examples": 5000}, gate={"min_test_examples": 40})
    (warning,) = size_warnings(low, "classification", 2)
    assert "min_examples is 300" in warning and "about 30 test examples" in warning
    assert "selects 400 inputs instead" in warning

    high = config(size={"min_examples": 100, "max_examples": 200}, gate={"min_test_examples": 40})
    (warning,) = size_warnings(high, "classification", 2)
    assert "max_examples is 200" in warning and "every gate would fail" in warning

    assert size_warnings(config(), "classification", 2) == []  # 1,000 inputs hold out 100


# --------------------------------------------------------------------------- retries


def test_after_a_failed_gate_the_next_attempt_grows_and_needs_new_inputs() -> None:
    cfg = config(
        size={"min_examples": 300, "max_examples": 5000, "growth_factor": 2.0},
        gate={"min_test_examples": 25},
        cold_start={"retry_s": 60},
        triggers={"on_breach": {"cooldown_s": 3600}},
    )
    plan = plan_retry(
        cfg,
        "classification",
        2,
        failed_at=1000.0,
        cold_start=True,
        size=319,
        selected=319,
        answers=319,
        kept=241,
        why="failed: test_set_size: 24 held-out examples",
    )

    assert plan.size == 638  # 319 grown by 2 (more than the 331 the drop rate asks for)
    assert plan.new_inputs == 638 - 319  # its growth must be inputs not seen before
    assert plan.not_before == 1060.0  # a cold start waits cold_start.retry_s
    assert plan.drop_rate == pytest.approx(78 / 319, abs=1e-4)
    breach = plan_retry(
        cfg, "classification", 2, failed_at=1000.0, cold_start=False, size=319, why="x"
    )
    assert breach.not_before == 4600.0  # a breach waits the breach cooldown
    # 800 asked for, 500 there: the next attempt grows from the 500 it had.
    short = plan_retry(
        config(size={"min_examples": 800, "max_examples": 1600}),
        "classification",
        2,
        failed_at=0.0,
        cold_start=False,
        size=800,
        selected=500,
        why="x",
    )
    assert (short.size, short.new_inputs) == (1000, 500)


def test_at_the_maximum_size_the_next_attempt_waits_for_a_whole_new_sample() -> None:
    cfg = config(size={"min_examples": 300, "max_examples": 300}, gate={"min_test_examples": 25})
    plan = plan_retry(
        cfg,
        "classification",
        2,
        failed_at=0.0,
        cold_start=True,
        size=300,
        selected=300,
        answers=300,
        kept=150,
        why="failed",
    )

    assert plan.size == 300 and plan.new_inputs == 300
    # Half the answers dropped: the gate needs 500 inputs, more than the maximum.
    assert "the gate needs 500 inputs, more than size.max_examples 300" in plan.why


def test_a_failure_outside_an_attempt_waits_for_the_cooldown_only() -> None:
    cfg = config(gate={"min_test_examples": 40}, cold_start={"retry_s": 30})
    plan = plan_retry(cfg, "classification", 2, failed_at=100.0, cold_start=True, why="boom")

    assert (plan.size, plan.new_inputs, plan.not_before) == (1000, 0, 130.0)
    assert retry_ready(plan, now=129.0, available=5000, new=0).start is False
    assert retry_ready(plan, now=130.0, available=5000, new=0).start
    # Errors in a row (a broken base model) double the wait, up to the breach cooldown.
    third = plan_retry(
        cfg, "classification", 2, failed_at=100.0, cold_start=True, why="boom", errors=3
    )
    assert third.not_before == 100.0 + 120.0 and third.errors == 3
    many = plan_retry(
        cfg, "classification", 2, failed_at=100.0, cold_start=True, why="boom", errors=99
    )
    assert many.not_before == 100.0 + cfg.triggers.on_breach.cooldown_s


def test_the_retry_waits_for_the_cooldown_the_inputs_and_the_new_ones() -> None:
    plan = RetryPlan(failed_at=0.0, not_before=60.0, size=800, new_inputs=400, why="x")

    early = retry_ready(plan, now=59.0, available=900, new=500)
    same_inputs = retry_ready(plan, now=61.0, available=900, new=399)
    too_few = retry_ready(plan, now=61.0, available=799, new=500)
    ready = retry_ready(plan, now=61.0, available=800, new=400)

    assert not early.start and not same_inputs.start and not too_few.start
    assert "next attempt after 1970-01-01T00:01:00Z with at least 800 inputs" in early.why
    assert "400 of them new since the failed attempt (have 900, 399 new)" in same_inputs.why
    assert ready.start


def test_a_retry_plan_survives_its_alert_payload() -> None:
    plan = RetryPlan(
        failed_at=1.5,
        not_before=61.5,
        size=800,
        new_inputs=400,
        why="failed: test_set_size",
        drop_rate=0.25,
        seeds=(("/state/seeds.txt", 10, 123),),
    )

    assert RetryPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


# --------------------------------------------------------------------------- breaches


def test_a_breach_counts_only_on_the_live_version_after_it_went_live() -> None:
    old = breach_is_current(measured_on="v1", checked_at=200.0, live_version="v2", live_since=100.0)
    before = breach_is_current(
        measured_on="v2", checked_at=99.0, live_version="v2", live_since=100.0
    )
    current = breach_is_current(
        measured_on="v2", checked_at=101.0, live_version="v2", live_since=100.0
    )

    assert not old.start and "measured on v1, which is no longer live (v2 is)" in old.why
    assert not before.start and "before v2 went live" in before.why
    assert current.start


def test_a_retry_beyond_what_the_reservoir_holds_waits_for_a_whole_new_one() -> None:
    plan = RetryPlan(failed_at=0.0, not_before=0.0, size=100_000, new_inputs=50_000, why="x")

    waiting = retry_ready(plan, now=1.0, available=20_000, new=19_999, most=20_000)
    ready = retry_ready(plan, now=1.0, available=20_000, new=20_000, most=20_000)

    assert not waiting.start and "at most 20000 inputs can be there" in waiting.why
    assert ready.start
    assert not retry_ready(plan, now=1.0, available=20_000, new=20_000).start  # no bound known

"""The retraining manager's decisions, as pure functions.

* :func:`may_start`: does a trigger start a retraining now (enabled, one at a
  time, breach cooldown)?
* :func:`shadow_verdict`: after the candidate answered live requests beside the
  live student, promote it, reject it, or keep waiting?
* :func:`rollback_verdict`: within the watch window after a promotion, does the
  new version do worse than the one it replaced?
* :func:`inputs_needed` / :func:`first_size`: how many inputs a job labels so that,
  after the quality filter, the held-out test set reaches the gate's minimum;
  :func:`size_warnings` says when a policy's sizes cannot (``policy validate``);
* :func:`plan_retry` / :func:`retry_ready`: after a failed attempt, what the next
  automatic one (cold start, breach) waits for: the cooldown, and inputs it has not
  seen, at the grown size;
* :func:`breach_is_current`: a breach starts a retraining only when it was measured
  on the version live now, after it went live (a breach is answered once).

Each returns a small frozen verdict with the numbers behind it, so that the
alert line can say why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from distilld.retrain.config import RetrainingConfig, RollbackConfig, ShadowConfig
from distilld.vocabulary import backoff_ceiling

__all__ = [
    "MAX_DROP_RATE",
    "TRIGGERS",
    "RetryPlan",
    "RollbackVerdict",
    "ShadowVerdict",
    "StartDecision",
    "breach_is_current",
    "examples_needed",
    "first_size",
    "inputs_needed",
    "may_start",
    "plan_retry",
    "retry_ready",
    "rollback_verdict",
    "shadow_verdict",
    "size_warnings",
]

Trigger = Literal["breach", "schedule", "manual", "cold_start"]
TRIGGERS: tuple[Trigger, ...] = ("breach", "schedule", "manual", "cold_start")


@dataclass(frozen=True)
class StartDecision:
    start: bool
    why: str


def may_start(
    trigger: Trigger,
    config: RetrainingConfig,
    *,
    running: bool,
    last_started_at: float | None,
    now: float,
    in_shadow: str | None = None,
) -> StartDecision:
    """Whether ``trigger`` starts a retraining of the task now.

    ``in_shadow``: the version of a candidate in its shadow run, if any. Its
    verdict comes first: a breach or the schedule does not start another
    retraining meanwhile (the candidate is the answer to the breach); a
    request by hand does, and its candidate replaces the one in shadow.
    """
    if not config.enabled:
        return StartDecision(False, "retraining is disabled in the policy")
    if running:
        return StartDecision(False, "a retraining of this task is already running")
    if in_shadow is not None and trigger != "manual":
        return StartDecision(
            False, f"candidate {in_shadow} is in its shadow run; its verdict comes first"
        )
    triggers = config.triggers
    if trigger == "breach":
        if not triggers.on_breach.enabled:
            return StartDecision(False, "retraining on breach is disabled in the policy")
        cooldown = triggers.on_breach.cooldown_s
        if last_started_at is not None and now - last_started_at < cooldown:
            left = cooldown - (now - last_started_at)
            return StartDecision(
                False,
                f"cooldown: the last retraining started {now - last_started_at:.0f} s ago "
                f"(cooldown_s {cooldown:.0f}; {left:.0f} s left)",
            )
    elif trigger == "schedule" and not triggers.schedule.enabled:
        return StartDecision(False, "scheduled retraining is disabled in the policy")
    elif trigger == "manual" and not triggers.manual.enabled:
        return StartDecision(False, "retraining by hand is disabled in the policy")
    return StartDecision(True, f"{trigger} trigger")


@dataclass(frozen=True)
class ShadowVerdict:
    decision: Literal["wait", "promote", "reject"]
    why: str
    n: int
    candidate: float | None
    live: float | None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def shadow_verdict(
    pairs: Sequence[tuple[float, float]], config: ShadowConfig, elapsed_s: float
) -> ShadowVerdict:
    """Judge the shadow run on ``pairs`` of (candidate score, live score), one per request
    both answered and the teacher scored."""
    n = len(pairs)
    candidate = _mean([c for c, _ in pairs])
    live = _mean([v for _, v in pairs])
    if n < config.min_comparisons:
        if elapsed_s >= config.max_duration_s:
            return ShadowVerdict(
                "reject",
                f"only {n} of the {config.min_comparisons} comparisons needed within "
                f"max_duration_s {config.max_duration_s:.0f}",
                n,
                candidate,
                live,
            )
        return ShadowVerdict(
            "wait", f"{n} of {config.min_comparisons} comparisons", n, candidate, live
        )
    assert candidate is not None and live is not None
    if candidate < live - config.tolerance:
        return ShadowVerdict(
            "reject",
            f"candidate {candidate:.4f} trails the live student {live:.4f} by more than "
            f"tolerance {config.tolerance} on {n} shadowed requests",
            n,
            candidate,
            live,
        )
    return ShadowVerdict(
        "promote",
        f"candidate {candidate:.4f} vs live {live:.4f} on {n} shadowed requests "
        f"(tolerance {config.tolerance})",
        n,
        candidate,
        live,
    )


@dataclass(frozen=True)
class RollbackVerdict:
    decision: Literal["watch", "keep", "rollback"]
    why: str
    n: int
    new: float | None
    previous: float | None


def rollback_verdict(
    new_scores: Sequence[float],
    previous: float | None,
    config: RollbackConfig,
    elapsed_s: float,
) -> RollbackVerdict:
    """Judge a promoted version on its comparisons since the promotion.

    ``previous`` is the replaced version's mean score before the promotion
    (None: unknown, e.g. it was never compared; nothing to roll back against).
    """
    n = len(new_scores)
    new = _mean(new_scores)
    if not config.enabled:
        return RollbackVerdict("keep", "automatic rollback is disabled", n, new, previous)
    if previous is None:
        return RollbackVerdict(
            "keep", "the previous version has no comparisons to compare with", n, new, previous
        )
    if elapsed_s > config.watch_window_s:
        return RollbackVerdict(
            "keep", f"the watch window of {config.watch_window_s:.0f} s is over", n, new, previous
        )
    if n < config.min_comparisons:
        return RollbackVerdict(
            "watch", f"{n} of {config.min_comparisons} comparisons", n, new, previous
        )
    assert new is not None
    if new < previous - config.tolerance:
        return RollbackVerdict(
            "rollback",
            f"accuracy {new:.4f} on {n} comparisons since the promotion is below the previous "
            f"version's {previous:.4f} by more than tolerance {config.tolerance}",
            n,
            new,
            previous,
        )
    return RollbackVerdict(
        "watch",
        f"accuracy {new:.4f} on {n} comparisons vs the previous version's {previous:.4f}",
        n,
        new,
        previous,
    )


# --------------------------------------------------------------------------- sizes

# The share of teacher answers the quality filter is assumed to drop at most when
# sizing a job (a larger observed share is capped: the inputs needed would explode;
# the job's own "dropped all" error covers the extreme).
MAX_DROP_RATE = 0.9
_EPSILON = 1e-9  # 40 / 0.1 is 400.00000000000006 in floats: not 401


def examples_needed(config: RetrainingConfig) -> int:
    """Kept (filtered) examples whose ``split.test`` share reaches ``gate.min_test_examples``.

    The split holds out ``round(n * test)`` of ``n`` distinct examples, so
    ``ceil(min_test_examples / test)`` suffice.
    """
    return math.ceil(config.gate.min_test_examples / config.split.test - _EPSILON)


def inputs_needed(config: RetrainingConfig, drop_rate: float = 0.0) -> int:
    """Inputs to label so that, after the quality filter drops ``drop_rate`` of the teacher
    answers, :func:`examples_needed` remain (``drop_rate`` capped at :data:`MAX_DROP_RATE`)."""
    rate = min(max(drop_rate, 0.0), MAX_DROP_RATE)
    return math.ceil(examples_needed(config) / (1.0 - rate) - _EPSILON)


def first_size(
    config: RetrainingConfig, kind: str, n_labels: int | None = None, drop_rate: float = 0.0
) -> int:
    """The first attempt's size: ``size.min_examples``, raised to what the gate needs
    (:func:`inputs_needed`), within ``size.max_examples``."""
    low, high = config.size.bounds(kind, n_labels)
    return min(max(low, inputs_needed(config, drop_rate)), high)


def size_warnings(config: RetrainingConfig, kind: str, n_labels: int | None = None) -> list[str]:
    """What a policy's sizes cannot do, before any teacher answer is dropped (``distilld
    policy validate`` prints these; the policy stays valid)."""
    low, high = config.size.bounds(kind, n_labels)
    needed = inputs_needed(config)
    test, minimum = config.split.test, config.gate.min_test_examples
    if high < needed:
        return [
            f"retraining.size.max_examples is {high}: {high} inputs hold out about "
            f"{round(high * test)} test examples at split.test {test}, fewer than "
            f"gate.min_test_examples {minimum} (which needs {needed} inputs, more if the "
            "quality filter drops answers); every gate would fail for lack of data. Raise "
            "max_examples, raise split.test or lower gate.min_test_examples"
        ]
    if low < needed:
        return [
            f"retraining.size.min_examples is {low}: {low} inputs hold out about "
            f"{round(low * test)} test examples at split.test {test}, fewer than "
            f"gate.min_test_examples {minimum}; the first attempt selects {needed} inputs "
            "instead (more once the quality filter is seen dropping answers). Set "
            f"min_examples to at least {needed} to say so"
        ]
    return []


# --------------------------------------------------------------------------- retries


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


@dataclass(frozen=True)
class RetryPlan:
    """What the next automatic attempt (cold start, breach) waits for after a failed one.

    It starts once ``not_before`` has passed and at least ``size`` inputs are there,
    ``new_inputs`` of them new since ``failed_at`` (traffic that arrived since, or
    the inputs of seed files changed since: ``seeds`` is their signature then), and
    it selects ``size`` inputs. A request by hand or the schedule does not wait,
    but also starts at ``size``.
    """

    failed_at: float
    not_before: float
    size: int
    new_inputs: int
    why: str
    drop_rate: float | None = None
    seeds: tuple[tuple[str, int, int], ...] = ()
    errors: int = 0  # consecutive jobs that failed with an error (not at the gate)

    def text(self, available: int | None = None, new: int | None = None) -> str:
        """One line for the alert log: what the next attempt waits for."""
        new_part = (
            f", {self.new_inputs} of them new since the failed attempt" if self.new_inputs else ""
        )
        have = ""
        if available is not None:
            have = f" (have {available}, {new} new)" if self.new_inputs else f" (have {available})"
        return (
            f"next attempt after {_iso(self.not_before)} with at least {self.size} "
            f"inputs{new_part}{have}; it selects {self.size} inputs"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "failed_at": self.failed_at,
            "not_before": self.not_before,
            "size": self.size,
            "new_inputs": self.new_inputs,
            "why": self.why,
            "drop_rate": self.drop_rate,
            "seeds": [list(s) for s in self.seeds],
            "errors": self.errors,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RetryPlan:
        return cls(
            failed_at=float(raw["failed_at"]),
            not_before=float(raw["not_before"]),
            size=int(raw["size"]),
            new_inputs=int(raw["new_inputs"]),
            why=str(raw["why"]),
            drop_rate=None if raw.get("drop_rate") is None else float(raw["drop_rate"]),
            seeds=tuple((str(p), int(n), int(m)) for p, n, m in raw.get("seeds", ())),
            errors=int(raw.get("errors", 0)),
        )


def plan_retry(
    config: RetrainingConfig,
    kind: str,
    n_labels: int | None,
    *,
    failed_at: float,
    cold_start: bool,
    size: int | None = None,
    selected: int = 0,
    answers: int = 0,
    kept: int = 0,
    why: str,
    seeds: tuple[tuple[str, int, int], ...] = (),
    errors: int = 0,
) -> RetryPlan:
    """The wait after a failed attempt.

    ``size``/``selected``: the last attempt's requested and selected inputs
    (None: the job failed with an error, the ``errors``-th in a row: it waits for
    the cooldown doubled per earlier error, up to the breach cooldown, at the first
    size; a broken base model must not relabel everything every minute);
    ``answers``/``kept``: teacher answers before and after the quality filter
    (their ratio is the observed drop rate). ``cold_start``:
    no student was live; the wait is ``cold_start.retry_s`` then, else the breach
    cooldown.

    The next size is the grown size (``size.growth_factor`` times the inputs the
    attempt had), at least ``size.min_examples`` and what the gate needs at the
    observed drop rate, within ``size.max_examples``. Its inputs beyond
    the ones selected before must be new; at the maximum, a whole new sample.
    """
    cooldown = config.cold_start.retry_s if cold_start else config.triggers.on_breach.cooldown_s
    drop_rate = 1.0 - kept / answers if answers else None
    needed = inputs_needed(config, drop_rate or 0.0)
    low, high = config.size.bounds(kind, n_labels)
    if size is None:
        longest = max(cooldown, config.triggers.on_breach.cooldown_s)
        wait = backoff_ceiling(errors - 1, cooldown, longest)
        return RetryPlan(
            failed_at=failed_at,
            not_before=failed_at + wait,
            size=first_size(config, kind, n_labels),
            new_inputs=0,
            why=why,
            seeds=seeds,
            errors=max(errors, 1),
        )
    used = selected if 0 < selected < size else size  # fewer were there than asked for
    grown = config.size.grow(used, kind, n_labels) or used
    next_size = min(max(grown, needed, low), high)
    new_inputs = next_size - selected if next_size > selected else next_size
    if needed > high:
        why += (
            f"; at the observed drop rate {drop_rate or 0.0:.0%} the gate needs {needed} "
            f"inputs, more than size.max_examples {high}: raise it, or lower "
            "filtering.min_teacher_confidence or gate.min_test_examples"
        )
    return RetryPlan(
        failed_at=failed_at,
        not_before=failed_at + cooldown,
        size=next_size,
        new_inputs=new_inputs,
        why=why,
        drop_rate=None if drop_rate is None else round(drop_rate, 4),
        seeds=seeds,
    )


def retry_ready(
    plan: RetryPlan, *, now: float, available: int, new: int, most: int | None = None
) -> StartDecision:
    """Whether the next automatic attempt may start: the cooldown is over and the inputs
    the plan waits for are there (``available`` inputs, ``new`` of them new).

    ``most``: the most inputs there can ever be (the bounded reservoir and the seed
    files; None: no bound); the plan's counts are capped at it, so that a size beyond
    it waits for a whole new reservoir rather than forever.
    """
    size, new_inputs = plan.size, plan.new_inputs
    if most is not None:
        size, new_inputs = min(size, most), min(new_inputs, most)
    if now < plan.not_before or available < size or new < new_inputs:
        why = plan.text(available, new)
        if (size, new_inputs) != (plan.size, plan.new_inputs):
            why += f" (at most {most} inputs can be there: it waits for {size}, {new_inputs} new)"
        return StartDecision(False, f"waiting after a failed attempt: {why}")
    return StartDecision(
        True,
        f"{available} inputs, {new} new since the failed attempt; selects {plan.size}",
    )


# --------------------------------------------------------------------------- breaches


def breach_is_current(
    *, measured_on: str | None, checked_at: float, live_version: str, live_since: float | None
) -> StartDecision:
    """Whether a breach may start a retraining: it must be measured on the version that
    is live now (``measured_on``; None: the check did not say), and no earlier than
    that version went live (``live_since``; None: unknown). A breach measured before a
    promotion (or a rollback) was answered by it; the next check measures the new one."""
    if measured_on is not None and measured_on != live_version:
        return StartDecision(
            False,
            f"the breach was measured on {measured_on}, which is no longer live "
            f"({live_version} is); the next check measures {live_version}",
        )
    if live_since is not None and checked_at < live_since:
        return StartDecision(
            False,
            f"the breach was measured at {_iso(checked_at)}, before {live_version} went live "
            f"at {_iso(live_since)}; the next check measures it",
        )
    return StartDecision(True, f"breach measured on {live_version} at {_iso(checked_at)}")

"""The retraining manager's decisions, as pure functions.

* :func:`may_start`: does a trigger start a retraining now (enabled, one at a
  time, breach cooldown)?
* :func:`shadow_verdict`: after the candidate answered live requests beside the
  live student, promote it, reject it, or keep waiting?
* :func:`rollback_verdict`: within the watch window after a promotion, does the
  new version do worse than the one it replaced?

Each returns a small frozen verdict with the numbers behind it, so that the
alert line can say why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from distilld.retrain.config import RetrainingConfig, RollbackConfig, ShadowConfig

__all__ = [
    "TRIGGERS",
    "RollbackVerdict",
    "ShadowVerdict",
    "StartDecision",
    "may_start",
    "rollback_verdict",
    "shadow_verdict",
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

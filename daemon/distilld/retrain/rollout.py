"""The rollout of a version: a candidate goes to shadow or straight to promotion,
promotion moves the registry's LIVE pointer and switches the task's slot, and a
promoted version is watched against the one it replaced and rolled back if it does
worse (:func:`~distilld.retrain.decide.rollback_verdict`).

The registry on disk is the source of truth: the served version follows its LIVE
pointer (:meth:`Rollout.follow_live`): promotion writes the pointer atomically first,
then switches the slot; a crash in between is finished by the next start, and a
``distilld promote`` / ``rollback`` from another process is followed within a tick.
The watch reads the registry's pointer and the stored comparisons alone (nothing to
lose in a crash). :class:`RolloutState` names where a task is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from enum import StrEnum

from distilld.log import get_logger
from distilld.registry import LivePointer, Manifest
from distilld.retrain.decide import rollback_verdict
from distilld.retrain.run import JobResult
from distilld.retrain.task import Decisions, RetrainTask, TaskState
from distilld.store.base import COMPARISONS_READ, SampleStore, StoredComparison

__all__ = ["Rollout", "RolloutState", "rollout_state", "watch_scores"]


class RolloutState(StrEnum):
    """Where a task's rollout is."""

    idle = "idle"  # the live version serves; nothing under way
    training = "training"  # a retraining job runs
    shadow = "shadow"  # a candidate answers sampled requests beside the live version
    promoting = "promoting"  # LIVE names a version the slot does not serve yet
    watching = "watching"  # a promoted version is in its watch window


def rollout_state(
    *, training: bool, in_shadow: bool, promoting: bool, watching: bool
) -> RolloutState:
    """The task's state from what holds now. A request by hand may train during a
    shadow run or a watch: the later step of the rollout is named first."""
    if promoting:
        return RolloutState.promoting
    if in_shadow:
        return RolloutState.shadow
    if watching:
        return RolloutState.watching
    if training:
        return RolloutState.training
    return RolloutState.idle


class Rollout:
    """Promotion, the slot switch, the watch and rollback, for every task."""

    def __init__(
        self,
        *,
        store: SampleStore,
        states: dict[str, TaskState],
        decisions: Decisions,
        tasks: Sequence[RetrainTask],
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._states = states
        self._decisions = decisions
        self._clock = clock
        # One switch at a time per task: the job thread and the tick may both
        # see a new LIVE version.
        self._switching = {t.name: threading.Lock() for t in tasks}
        self._unservable: dict[str, set[str]] = {t.name: set() for t in tasks}
        self._log = get_logger("retrain")

    def state(self, task: RetrainTask, *, in_shadow: bool) -> RolloutState:
        live = task.registry.live_version()
        return rollout_state(
            training=self._states[task.name].training,
            in_shadow=in_shadow,
            promoting=live is not None
            and live != task.slot.model_version
            and live not in self._unservable[task.name],
            watching=self._watched(task) is not None,
        )

    def candidate_ready(self, task: RetrainTask, result: JobResult) -> None:
        """A registered candidate: the first student and a task without a shadow run
        are promoted; otherwise the next tick starts its shadow run."""
        version = result.version
        assert version is not None
        first = task.registry.live_version() is None
        shadow = task.config.shadow
        self._decisions.record(
            task,
            "retrain.candidate_ready",
            severity="info",
            version=version,
            gate=result.gate.summary,
            attempts=len(result.attempts),
            filtering=result.data.get("filtering", {}).get("dropped"),
            train_examples=result.data.get("split", {}).get("sizes", {}).get("train"),
            seconds=result.duration_s,
            action=(
                "promoting: first student of the task"
                if first
                else "shadow run on live traffic"
                if shadow.enabled and task.load_candidate is not None
                else "promoting (shadow disabled)"
            ),
        )
        if first or not shadow.enabled or task.load_candidate is None:
            self.promote(task, version, why=f"gate {result.gate.summary}")
            return
        task.registry.set_state(version, "shadow")  # the next tick starts the shadow run

    def promote(self, task: RetrainTask, version: str, *, why: str) -> None:
        previous = task.slot.model_version
        manifest = task.registry.promote(version)  # the atomic step: LIVE now names it
        if self.follow_live(task):
            self._decisions.record(
                task,
                "retrain.promoted",
                severity="info",
                version=version,
                previous=previous,
                why=why,
                metrics=manifest.metrics.get("gate_summary"),
                action="the new version answers from the next batch; it is watched for "
                f"{task.config.rollback.watch_window_s:.0f} s against the previous one",
            )

    def follow_live(self, task: RetrainTask) -> bool:
        """Serve the registry's live version; True when it is served now."""
        with self._switching[task.name]:
            return self._follow_live_locked(task)

    def _follow_live_locked(self, task: RetrainTask) -> bool:
        live = task.registry.live_version()
        if live is None or live == task.slot.model_version:
            return live is not None
        unservable = self._unservable[task.name]
        if live in unservable:
            return False
        previous = task.slot.model_version
        try:
            task.slot.switch(task.registry.path(live), live)
        except Exception as exc:
            unservable.add(live)
            can_roll_back = task.registry.previous_live() is not None
            if can_roll_back:
                task.registry.rollback()
            self._decisions.record(
                task,
                "retrain.switch_failed",
                severity="error",
                version=live,
                serving=previous,
                error=f"{type(exc).__name__}: {exc}",
                action=(
                    f"{previous} keeps serving; the registry was rolled back to it"
                    if can_roll_back
                    else f"{previous} keeps serving; fix the version or promote another"
                ),
            )
            return False
        # A new live version: earlier failures no longer hold it back.
        self._states[task.name].retry = None
        self._log.info("retrain.serving", task=task.name, version=live, previous=previous)
        return True

    def _watched(self, task: RetrainTask) -> tuple[LivePointer, float] | None:
        """The pointer of a promoted version in its watch window, and the time since
        its promotion; None when nothing is watched."""
        pointer = task.registry.pointer()
        if pointer is None or pointer.retire is None or pointer.retire_state != "retired":
            return None  # nothing replaced, or the last change was itself a rollback
        if pointer.version != task.slot.model_version:
            return None
        elapsed = self._clock() - pointer.updated_at
        if elapsed > task.config.rollback.watch_window_s:
            return None
        return pointer, elapsed

    def watch(self, task: RetrainTask) -> None:
        """Roll a promoted version back when it does worse than the one it replaced."""
        watched = self._watched(task)
        if watched is None:
            return
        pointer, elapsed = watched
        assert pointer.retire is not None
        comparisons = self._store.last_comparisons(task.name, COMPARISONS_READ)
        new_scores, previous = watch_scores(
            comparisons,
            pointer.version,
            pointer.retire,
            since=pointer.updated_at,
            window=task.policy.monitors.accuracy.window,
        )
        verdict = rollback_verdict(new_scores, previous, task.config.rollback, elapsed)
        if verdict.decision != "rollback":
            return
        restored: Manifest = task.registry.rollback()
        self.follow_live(task)
        self._decisions.record(
            task,
            "retrain.rolled_back",
            severity="error",
            metric="accuracy",
            value=verdict.new,
            threshold=verdict.previous,
            version=pointer.version,
            restored=restored.version,
            why=verdict.why,
            comparisons=verdict.n,
            action=f"{restored.version} serves again; {pointer.version} is marked rolled_back",
        )


def watch_scores(
    comparisons: Sequence[StoredComparison],
    version: str,
    previous: str,
    *,
    since: float,
    window: int,
) -> tuple[list[float], float | None]:
    """Scores of ``version`` since its promotion, and the mean of ``previous``'s last
    ``window`` scores before it (None when it has none)."""
    new = [
        c.score
        for c in comparisons
        if c.model_version == version and c.score is not None and c.created_at >= since
    ]
    before = sorted(
        (c for c in comparisons if c.model_version == previous and c.score is not None),
        key=lambda c: c.created_at,
    )[-window:]
    scores = [c.score for c in before if c.score is not None]
    return new, (sum(scores) / len(scores) if scores else None)

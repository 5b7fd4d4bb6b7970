"""The shadow run of a candidate: a registered candidate (state ``shadow`` in the
registry) answers a share of the teacher-compared requests beside the live student
(:meth:`~distilld.shadow.worker.ShadowWorker.set_candidate`), its answers never go
out; each tick judges the pairs (:func:`~distilld.retrain.decide.shadow_verdict`) and
promotes it or retires it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from distilld.retrain.decide import shadow_verdict
from distilld.retrain.rollout import Rollout
from distilld.retrain.task import Decisions, RetrainTask
from distilld.serving.base import StudentBackend
from distilld.shadow.worker import ShadowWorker
from distilld.store.base import COMPARISONS_READ, SampleStore, StoredComparison

__all__ = ["ShadowRun", "in_shadow", "shadow_pairs"]


def in_shadow(task: RetrainTask) -> str | None:
    """The version of the task's candidate in its shadow run (the registry's)."""
    return next((m.version for m in task.registry.list() if m.state == "shadow"), None)


class ShadowRun:
    """Loads the newest candidate in shadow, judges it each tick, ends its run."""

    def __init__(
        self,
        *,
        shadow: ShadowWorker | None,
        store: SampleStore,
        decisions: Decisions,
        rollout: Rollout,
        clock: Callable[[], float],
    ) -> None:
        self._shadow = shadow
        self._store = store
        self._decisions = decisions
        self._rollout = rollout
        self._clock = clock
        self._candidates: dict[str, StudentBackend] = {}  # task: its candidate, loaded

    def advance(self, task: RetrainTask) -> None:
        in_shadow = [m for m in task.registry.list() if m.state == "shadow"]
        if not in_shadow:
            self.end(task.name)
            return
        newest = in_shadow[-1]
        for older in in_shadow[:-1]:  # a newer candidate replaces an older one
            task.registry.set_state(older.version, "retired")
        candidate = self._candidates.get(task.name)
        if candidate is None or candidate.model_version != newest.version:
            self.end(task.name)
            if task.load_candidate is None or self._shadow is None:
                self._rollout.promote(task, newest.version, why="no shadow run possible here")
                return
            candidate = task.load_candidate(task.registry.path(newest.version), newest.version)
            self._candidates[task.name] = candidate
            self._shadow.set_candidate(task.name, candidate, task.config.shadow.share)
            self._decisions.record(
                task,
                "retrain.shadow_started",
                severity="info",
                version=newest.version,
                share=task.config.shadow.share,
                min_comparisons=task.config.shadow.min_comparisons,
                action="the candidate answers sampled requests beside the live student; "
                "its answers do not go out",
            )
        live = task.slot.model_version
        pairs = shadow_pairs(
            self._store.last_comparisons(task.name, COMPARISONS_READ), newest.version, live
        )
        verdict = shadow_verdict(pairs, task.config.shadow, self._clock() - newest.state_changed_at)
        if verdict.decision == "wait":
            return
        self.end(task.name)
        if verdict.decision == "promote":
            self._rollout.promote(task, newest.version, why=f"shadow: {verdict.why}")
        else:
            task.registry.set_state(newest.version, "retired")
            self._decisions.record(
                task,
                "retrain.shadow_rejected",
                severity="warning",
                version=newest.version,
                why=verdict.why,
                comparisons=verdict.n,
                candidate=verdict.candidate,
                live=verdict.live,
                action="the candidate is retired; the live student keeps serving",
            )

    def end(self, task: str) -> None:
        """Stop the task's shadow run, if one runs here, and close its candidate."""
        candidate = self._candidates.pop(task, None)
        if candidate is None:
            return
        if self._shadow is not None:
            self._shadow.set_candidate(task, None)
        candidate.close()


def shadow_pairs(
    comparisons: Sequence[StoredComparison], candidate: str, live: str
) -> list[tuple[float, float]]:
    """(candidate score, live score) for each request both versions answered."""
    live_scores = {
        c.request_id: c.score
        for c in comparisons
        if c.model_version == live and c.score is not None
    }
    return [
        (c.score, live_scores[c.request_id])
        for c in comparisons
        if c.model_version == candidate and c.score is not None and c.request_id in live_scores
    ]

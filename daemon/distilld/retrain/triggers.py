"""What starts a retraining: a monitor breach (with the policy's cooldown; only a
breach measured on the live version after it went live), the cron schedule, a request
file left by ``distilld retrain TASK``, and a cold start (no student yet). One
retraining per task at a time in this process (the task's job thread); across
processes the job takes a lock file (:mod:`distilld.retrain.jobs`).

After a failed attempt the next automatic one (cold start, breach) waits for the
cooldown and for inputs it has not seen, and starts at the grown size
(:func:`~distilld.retrain.decide.retry_ready`); the plan is in the failure's alert, so
a restart keeps it (:func:`last_retry`), as it keeps the cooldown (:func:`last_start`).
Whether to start is decided in :mod:`distilld.retrain.decide`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
    BackgroundScheduler,
)
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]

from distilld.errors import DistilldError
from distilld.log import get_logger
from distilld.monitoring.evaluate import Status
from distilld.registry import ModelRegistry
from distilld.retrain.decide import (
    RetryPlan,
    StartDecision,
    Trigger,
    breach_is_current,
    inputs_needed,
    may_start,
    retry_ready,
)
from distilld.retrain.jobs import FAILED, GATE_FAILED, STARTED, seed_signature
from distilld.retrain.requests import take_request
from distilld.retrain.run import read_seed_inputs
from distilld.retrain.shadow_run import in_shadow
from distilld.retrain.task import Decisions, RetrainTask, TaskState
from distilld.serving.swap import COLD_START_VERSION, NO_STUDENT_VERSION
from distilld.store.base import SampleStore

__all__ = ["WAITING_TRIGGERS", "Triggers", "last_retry", "last_start", "schedule"]

# Triggers that wait for a failed attempt's retry plan; a request by hand and the
# schedule do not (but start at its size).
WAITING_TRIGGERS: frozenset[Trigger] = frozenset({"breach", "cold_start"})

JobTarget = Callable[[RetrainTask, Trigger, int | None], None]


class Triggers:
    """Decides on each trigger and starts the task's job on its own thread."""

    def __init__(
        self,
        *,
        tasks: Mapping[str, RetrainTask],
        states: dict[str, TaskState],
        store: SampleStore,
        decisions: Decisions,
        requests_dir: Path,
        job: JobTarget,
        clock: Callable[[], float],
        reservoir_size: int | None,
    ) -> None:
        self._tasks = tasks
        self._states = states
        self._store = store
        self._decisions = decisions
        self._requests_dir = requests_dir
        self._job = job
        self._clock = clock
        self._reservoir_size = reservoir_size  # the store's bound per task (None: none)
        self._lock = threading.Lock()
        self._log = get_logger("retrain")

    def request(self, task: str, trigger: Trigger) -> StartDecision:
        """Start a retraining of ``task`` if the policy allows it now; says why not."""
        spec = self._tasks.get(task)
        if spec is None:
            why = "the task's policy has no enabled retraining section"
            self._log.info("retrain.skipped", task=task, trigger=trigger, why=why)
            return StartDecision(False, why)
        now = self._clock()
        # Whether a shadow run holds this trigger is decided in may_start.
        shadowed = in_shadow(spec)
        plan = self._states[task].retry
        waiting = None
        if plan is not None and trigger in WAITING_TRIGGERS:
            available, new, most = self._inputs_since(spec, plan)
            waiting = retry_ready(plan, now=now, available=available, new=new, most=most)
        with self._lock:
            state = self._states[task]
            decision = may_start(
                trigger,
                spec.config,
                running=state.training,
                last_started_at=state.last_started_at,
                now=now,
                in_shadow=shadowed,
            )
            if decision.start and waiting is not None and not waiting.start:
                self._log.info("retrain.waiting", task=task, trigger=trigger, why=waiting.why)
                return waiting
            if not decision.start:
                self._log.info("retrain.skipped", task=task, trigger=trigger, why=decision.why)
                return decision
            state.last_started_at = now
            thread = threading.Thread(
                target=self._job,
                args=(spec, trigger, plan.size if plan is not None else None),
                name=f"retrain-{task}",
                daemon=True,
            )
            state.job = thread
        thread.start()
        return decision

    def after_check(
        self,
        task: str,
        verdicts: Sequence[object],
        measured_on: str | None,
        checked_at: float,
    ) -> None:
        """A breach verdict triggers a retraining (cooldown permitting), unless it was
        measured on a version no longer live, or before the live one went live."""
        breached = [v for v in verdicts if getattr(v, "status", None) is Status.breach]
        spec = self._tasks.get(task)
        if not breached or spec is None:
            return
        pointer = spec.registry.pointer()
        current = breach_is_current(
            measured_on=measured_on,
            checked_at=checked_at,
            live_version=spec.slot.model_version,
            live_since=pointer.updated_at if pointer is not None else None,
        )
        if not current.start:
            self._log.info("retrain.skipped", task=task, trigger="breach", why=current.why)
            return
        self.request(task, "breach")

    def pick_up_request(self, task: RetrainTask) -> None:
        """A request left by ``distilld retrain TASK``."""
        if not take_request(self._requests_dir, task.name):
            return
        decision = self.request(task.name, "manual")
        self._decisions.record(
            task,
            "retrain.requested",
            severity="info",
            trigger="manual",
            started=decision.start,
            why=decision.why,
            action="retraining started" if decision.start else "not started",
        )

    def cold_start(self, task: RetrainTask) -> None:
        """No student yet: train the first once enough inputs exist."""
        if task.slot.model_version not in (COLD_START_VERSION, NO_STUDENT_VERSION):
            return
        state = self._states[task.name]
        if task.registry.live_version() is not None or state.training:
            return
        if self._clock() < state.next_cold_start_at:
            return
        state.next_cold_start_at = self._clock() + task.config.cold_start.retry_s
        if state.retry is not None:  # after a failed attempt: request() says what it waits for
            self.request(task.name, "cold_start")
            return
        needed = inputs_needed(task.config)
        available = len(self._store.reservoir(task.name, limit=needed))
        available += sum(len(read_seed_inputs(p)) for p in task.seed_files)
        if available < needed:
            self._log.info(
                "retrain.cold_start_waiting",
                task=task.name,
                inputs=available,
                needed=needed,
                note="the first student is trained once enough traffic (or seed inputs) exists",
            )
            return
        self.request(task.name, "cold_start")

    def _inputs_since(self, task: RetrainTask, plan: RetryPlan) -> tuple[int, int, int | None]:
        """Inputs there now (reservoir and seed files, up to what the plan needs), how
        many of them are new since the plan's failure (traffic stored since, and the
        inputs of seed files changed since), and the most there can be (None: no bound)."""
        recent = self._store.reservoir(task.name, limit=max(plan.size, plan.new_inputs, 1))
        try:
            seeds = sum(len(read_seed_inputs(p)) for p in task.seed_files)
        except DistilldError:
            seeds = 0  # the job's own read says what is wrong with the file
        new = sum(1 for s in recent if s.created_at > plan.failed_at)
        if seed_signature(task.seed_files) != plan.seeds:
            new += seeds
        most = None if self._reservoir_size is None else self._reservoir_size + seeds
        return len(recent) + seeds, new, most


def schedule(
    tasks: Sequence[RetrainTask], request: Callable[[str, Trigger], object]
) -> BackgroundScheduler:
    """A scheduler (not started) that requests each task's retraining on its cron."""
    scheduler = BackgroundScheduler(timezone="UTC")
    for task in tasks:
        cron = task.config.triggers.schedule
        if task.config.enabled and cron.enabled:
            scheduler.add_job(
                request,
                CronTrigger.from_crontab(cron.cron, timezone="UTC"),
                args=[task.name, "schedule"],
                id=f"retrain:{task.name}",
                max_instances=1,
                coalesce=True,
            )
    return scheduler


def last_retry(store: SampleStore, registry: ModelRegistry, task: str) -> RetryPlan | None:
    """A failed attempt's wait survives a restart: its plan is in the failure's alert,
    unless a candidate or a promotion came after it."""
    with contextlib.suppress(Exception):
        pointer = registry.pointer()
        for event in reversed(store.last_alerts(task, limit=200)):  # newest first
            if event.kind in (GATE_FAILED, FAILED):
                raw = event.payload.get("next_attempt")
                plan = RetryPlan.from_dict(raw) if isinstance(raw, dict) else None
                live_since = pointer.updated_at if pointer is not None else 0.0
                if plan is not None and live_since > plan.failed_at:
                    return None  # a version went live since (by hand): it no longer holds
                return plan
            if event.kind in ("retrain.candidate_ready", "retrain.promoted"):
                return None
    return None


def last_start(store: SampleStore, task: str) -> float | None:
    """The cooldown survives a restart: the last start is in the alert records."""
    with contextlib.suppress(Exception):
        for event in reversed(store.last_alerts(task, limit=200)):  # newest first
            if event.kind == STARTED:
                return event.created_at
    return None

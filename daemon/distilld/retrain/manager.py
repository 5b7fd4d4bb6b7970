"""Runs retrainings and moves versions through shadow, promotion, watch and rollback.

The facade the daemon holds (:class:`RetrainManager`): the monitor's hook
(:meth:`~RetrainManager.after_check`) and a tick every few seconds
(:meth:`~RetrainManager.tick`). The registry on disk is the source of truth; the
manager keeps the daemon in line with it, so that a crash at any point, or a
``distilld promote`` / ``rollback`` / ``retrain`` from another process, is picked up
by the next tick. Its parts, one job each:

* :mod:`~distilld.retrain.triggers`: breach, schedule, requests by hand, cold start
  and the retry plan after a failed attempt;
* :mod:`~distilld.retrain.jobs`: one retraining job, its failure alert and retry plan;
* :mod:`~distilld.retrain.shadow_run`: a candidate's shadow run on live traffic;
* :mod:`~distilld.retrain.rollout`: promotion, the slot switch, the watch and
  rollback, and :class:`~distilld.retrain.rollout.RolloutState`.

The decisions are pure functions in :mod:`~distilld.retrain.decide`. Every decision
goes through the task's AlertSink (log, store, alerts topic); any failure leaves the
live student serving and produces one alert with the reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
    BackgroundScheduler,
)

from distilld.log import get_logger
from distilld.retrain.decide import StartDecision, Trigger
from distilld.retrain.jobs import JobRunner
from distilld.retrain.rollout import Rollout, RolloutState
from distilld.retrain.shadow_run import ShadowRun, in_shadow
from distilld.retrain.task import Decisions, RetrainTask, TaskState
from distilld.retrain.triggers import Triggers, last_retry, last_start, schedule
from distilld.shadow.worker import ShadowWorker
from distilld.store.base import SampleStore

__all__ = ["RetrainManager"]


class RetrainManager:
    """See the module docstring."""

    def __init__(
        self,
        tasks: Sequence[RetrainTask],
        *,
        store: SampleStore,
        shadow: ShadowWorker | None,
        requests_dir: Path,
        work_dir: Path,
        tick_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        reservoir_size: int | None = None,
    ) -> None:
        self._tasks = {t.name: t for t in tasks}
        self._tick_s = tick_s
        self._states = {
            t.name: TaskState(
                last_started_at=last_start(store, t.name),
                retry=last_retry(store, t.registry, t.name),
            )
            for t in tasks
        }
        self._decisions = Decisions()
        self._stop = threading.Event()  # also cancels a job in progress at its next step
        self._rollout = Rollout(
            store=store, states=self._states, decisions=self._decisions, tasks=tasks, clock=clock
        )
        self._shadow_run = ShadowRun(
            shadow=shadow,
            store=store,
            decisions=self._decisions,
            rollout=self._rollout,
            clock=clock,
        )
        self._jobs = JobRunner(
            store=store,
            states=self._states,
            decisions=self._decisions,
            work_dir=work_dir,
            cancel=self._stop,
            clock=clock,
            on_candidate=self._rollout.candidate_ready,
        )
        self._triggers = Triggers(
            tasks=self._tasks,
            states=self._states,
            store=store,
            decisions=self._decisions,
            requests_dir=requests_dir,
            job=self._jobs.run,
            clock=clock,
            reservoir_size=reservoir_size,
        )
        self._thread: threading.Thread | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._log = get_logger("retrain")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._jobs.remove_leftovers(self._tasks)
        scheduler = schedule(list(self._tasks.values()), self.request)
        scheduler.start()
        self._scheduler = scheduler
        self._thread = threading.Thread(target=self._loop, name="retrain-manager", daemon=True)
        self._thread.start()
        self._log.info(
            "retrain.manager_started",
            tasks=sorted(self._tasks),
            schedules={
                t.name: t.config.triggers.schedule.cron
                for t in self._tasks.values()
                if t.config.triggers.schedule.enabled
            },
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop triggering; a retraining in progress stops at its next step (a training
        step, a teacher batch) and registers nothing."""
        self._stop.set()
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        for name in self._tasks:
            if not self.wait_idle(name, timeout_s):
                self._log.warning("retrain.still_running_at_stop", task=name)
        for name in self._tasks:
            self._shadow_run.end(name)

    def running(self, task: str) -> bool:
        return self._states[task].training

    def wait_idle(self, task: str, timeout_s: float) -> bool:
        """Wait until no retraining of ``task`` runs (tests, the demo)."""
        job = self._states[task].job
        if job is not None:
            job.join(timeout_s)
        return not self.running(task)

    def state(self, task: str) -> RolloutState:
        """Where ``task``'s rollout is (status, tests)."""
        spec = self._tasks[task]
        return self._rollout.state(spec, in_shadow=in_shadow(spec) is not None)

    def outcomes(self, task: str) -> dict[str, int]:
        """How many times each decision was taken for ``task`` since the start
        (started, promoted, gate_failed, failed, rolled_back ...): /metrics."""
        return self._decisions.counts(task)

    # ------------------------------------------------------------------ triggers

    def request(self, task: str, trigger: Trigger) -> StartDecision:
        """Start a retraining of ``task`` if the policy allows it now; says why not."""
        return self._triggers.request(task, trigger)

    def after_check(
        self,
        task: str,
        verdicts: Sequence[object],
        measured_on: str | None,
        checked_at: float,
    ) -> None:
        """The monitor's hook: a breach verdict triggers a retraining (cooldown permitting).

        ``measured_on``: the version the check measured (None: not known);
        ``checked_at``: when. A breach measured on a version that is no longer live,
        or before the live one went live, was answered already: it starts nothing.
        """
        self._triggers.after_check(task, verdicts, measured_on, checked_at)

    # ------------------------------------------------------------------ the tick

    def _loop(self) -> None:
        while not self._stop.wait(self._tick_s):
            self.tick()

    def tick(self) -> None:
        """Pick up requests, follow the LIVE pointer, cold starts, shadow runs, watches."""
        for task in self._tasks.values():
            try:
                self._triggers.pick_up_request(task)
                self._rollout.follow_live(task)
                self._triggers.cold_start(task)
                self._shadow_run.advance(task)
                self._rollout.watch(task)
            except Exception as exc:  # one task's trouble must not stop the others
                self._log.error(
                    "retrain.tick_failed", task=task.name, error=f"{type(exc).__name__}: {exc}"
                )

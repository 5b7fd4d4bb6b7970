"""Runs retrainings and moves versions through shadow, promotion, watch and rollback.

The registry on disk is the source of truth; this manager keeps the daemon in
line with it, so that a crash at any point, or a ``distilld promote`` /
``rollback`` / ``retrain`` from another process, is picked up by the next tick:

* triggers: a monitor breach (:meth:`RetrainManager.after_check`, with the
  policy's cooldown; only a breach measured on the live version after it went
  live), the cron schedule, a request file left by ``distilld retrain TASK``,
  and a cold start (no student yet). One retraining per task at a time, in
  this process (a set) and across processes sharing the registry (a lock file);
* after a failed attempt the next automatic one (cold start, breach) waits for
  the cooldown and for inputs it has not seen, and starts at the grown size
  (:func:`~distilld.retrain.decide.plan_retry`); the plan is in the failure's
  alert, so a restart keeps it;
* a registered candidate goes to shadow (state ``shadow`` in the registry): the
  shadow worker lets it answer a share of the teacher-compared requests; each
  tick judges the pairs (:func:`~distilld.retrain.decide.shadow_verdict`) and
  promotes it or retires it;
* the served version follows the registry's LIVE pointer (:meth:`_follow_live`):
  promotion writes the pointer atomically first, then swaps the backend; a crash
  in between is finished by the next start;
* after a promotion the new version is watched
  (:func:`~distilld.retrain.decide.rollback_verdict`) against the replaced
  version's accuracy, from the registry's pointer and the stored comparisons
  alone (nothing to lose in a crash); a worse version is rolled back.

Every decision goes through the task's AlertSink (log, store, alerts topic);
any failure leaves the live student serving and produces one alert with the
reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
    BackgroundScheduler,
)
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]

from distilld.alerts import AlertSink
from distilld.errors import DistilldError
from distilld.log import get_logger
from distilld.monitoring.evaluate import Status
from distilld.policy.model import Policy
from distilld.registry import Manifest, ModelRegistry
from distilld.retrain.config import RetrainingConfig
from distilld.retrain.decide import (
    RetryPlan,
    StartDecision,
    Trigger,
    breach_is_current,
    inputs_needed,
    may_start,
    plan_retry,
    retry_ready,
    rollback_verdict,
    shadow_verdict,
)
from distilld.retrain.gates import FAILED_GATES_DIR
from distilld.retrain.run import (
    JobInputs,
    JobResult,
    RetrainCancelled,
    read_seed_inputs,
    run_retraining,
)
from distilld.serving.base import StudentBackend
from distilld.serving.swap import COLD_START_VERSION, NO_STUDENT_VERSION
from distilld.shadow.worker import ShadowWorker
from distilld.store.base import SampleStore, StoredComparison
from distilld.teacher.base import Teacher

__all__ = ["ModelSlot", "RetrainManager", "RetrainTask", "request_retraining"]

STARTED = "retrain.started"
GATE_FAILED = "retrain.gate_failed"
FAILED = "retrain.failed"
# Triggers that wait for a failed attempt's retry plan; a request by hand and the
# schedule do not (but start at its size).
WAITING_TRIGGERS: frozenset[Trigger] = frozenset({"breach", "cold_start"})
COMPARISONS_READ = 50_000  # comparisons read to judge a shadow run or a promoted version


class ModelSlot(Protocol):
    """Where a task's live model is served; the manager switches it."""

    @property
    def model_version(self) -> str: ...

    def switch(self, model_dir: Path, version: str) -> None:
        """Serve ``model_dir`` as ``version`` from the next batch on, without losing
        requests; raise (and keep serving the old version) if it cannot."""
        ...


@dataclass
class RetrainTask:
    """One task the manager retrains, with the parts it needs."""

    policy: Policy
    config: RetrainingConfig
    teacher: Teacher
    registry: ModelRegistry
    slot: ModelSlot
    sink: AlertSink
    base_model_dir: Path
    seed_files: Sequence[Path] = ()
    flags_file: Path | None = None
    load_candidate: Callable[[Path, str], StudentBackend] | None = None
    """Loads a candidate for the shadow run (in-process); None: no shadow possible."""

    @property
    def name(self) -> str:
        return self.policy.task


@dataclass
class _State:
    running: threading.Thread | None = None
    last_started_at: float | None = None
    next_cold_start_at: float = 0.0
    candidate: StudentBackend | None = None
    unservable: set[str] = field(default_factory=set)
    retry: RetryPlan | None = None  # after a failed attempt: what the next one waits for


def request_retraining(requests_dir: Path, task: str) -> Path:
    """Leave a retraining request for the running daemon (``distilld retrain TASK``)."""
    requests_dir.mkdir(parents=True, exist_ok=True)
    path = requests_dir / f"{task}.retrain"
    tmp = requests_dir / f".{task}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(f"{time.time()}\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


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
        self._store = store
        self._shadow = shadow
        self._requests_dir = requests_dir
        self._work_dir = work_dir
        self._tick_s = tick_s
        self._clock = clock
        self._reservoir_size = reservoir_size  # the store's bound per task (None: none)
        self._lock = threading.Lock()
        self._states = {
            t.name: _State(last_started_at=self._last_start(t.name), retry=self._last_retry(t.name))
            for t in tasks
        }
        self._outcomes: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()  # also cancels a job in progress at its next step
        # One switch at a time per task: the job thread and the tick may both
        # see a new LIVE version.
        self._switching = {t.name: threading.Lock() for t in tasks}
        self._thread: threading.Thread | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._log = get_logger("retrain")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        # A job killed with its process (SIGKILL, power loss) left its scratch files.
        for name in self._tasks:
            for leftover in (self._work_dir / name).glob("job-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        scheduler = BackgroundScheduler(timezone="UTC")
        for task in self._tasks.values():
            schedule = task.config.triggers.schedule
            if task.config.enabled and schedule.enabled:
                scheduler.add_job(
                    self.request,
                    CronTrigger.from_crontab(schedule.cron, timezone="UTC"),
                    args=[task.name, "schedule"],
                    id=f"retrain:{task.name}",
                    max_instances=1,
                    coalesce=True,
                )
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
        for name, state in self._states.items():
            if state.candidate is not None:
                if self._shadow is not None:
                    self._shadow.set_candidate(name, None)
                state.candidate.close()
                state.candidate = None

    def running(self, task: str) -> bool:
        with self._lock:
            thread = self._states[task].running
        return thread is not None and thread.is_alive()

    def wait_idle(self, task: str, timeout_s: float) -> bool:
        """Wait until no retraining of ``task`` runs (tests, the demo)."""
        with self._lock:
            thread = self._states[task].running
        if thread is not None:
            thread.join(timeout_s)
        return not self.running(task)

    # ------------------------------------------------------------------ triggers

    def request(self, task: str, trigger: Trigger) -> StartDecision:
        """Start a retraining of ``task`` if the policy allows it now; says why not."""
        spec = self._tasks.get(task)
        if spec is None:
            why = "the task's policy has no enabled retraining section"
            self._log.info("retrain.skipped", task=task, trigger=trigger, why=why)
            return StartDecision(False, why)
        now = self._clock()
        # Whether a shadow run holds this trigger is decided in may_start.
        in_shadow = next((m.version for m in spec.registry.list() if m.state == "shadow"), None)
        plan = self._states[task].retry
        waiting = None
        if plan is not None and trigger in WAITING_TRIGGERS:
            available, new, most = self._inputs_since(spec, plan)
            waiting = retry_ready(plan, now=now, available=available, new=new, most=most)
        with self._lock:
            state = self._states[task]
            alive = state.running is not None and state.running.is_alive()
            decision = may_start(
                trigger,
                spec.config,
                running=alive,
                last_started_at=state.last_started_at,
                now=now,
                in_shadow=in_shadow,
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
            state.running = thread
        thread.start()
        return decision

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

    # ------------------------------------------------------------------ the tick

    def _loop(self) -> None:
        while not self._stop.wait(self._tick_s):
            self.tick()

    def tick(self) -> None:
        """Pick up requests, follow the LIVE pointer, cold starts, shadow runs, watches."""
        for task in self._tasks.values():
            try:
                self._pick_up_request(task)
                self._follow_live(task)
                self._cold_start(task)
                self._advance_shadow(task)
                self._watch(task)
            except Exception as exc:  # one task's trouble must not stop the others
                self._log.error(
                    "retrain.tick_failed", task=task.name, error=f"{type(exc).__name__}: {exc}"
                )

    def _pick_up_request(self, task: RetrainTask) -> None:
        path = self._requests_dir / f"{task.name}.retrain"
        try:
            path.unlink()
        except FileNotFoundError:
            return
        decision = self.request(task.name, "manual")
        self._decision(
            task,
            "retrain.requested",
            severity="info",
            trigger="manual",
            started=decision.start,
            why=decision.why,
            action="retraining started" if decision.start else "not started",
        )

    def _cold_start(self, task: RetrainTask) -> None:
        if task.slot.model_version not in (COLD_START_VERSION, NO_STUDENT_VERSION):
            return
        if task.registry.live_version() is not None or self.running(task.name):
            return
        state = self._states[task.name]
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

    # ------------------------------------------------------------------ the job

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

    def _serving_note(self, task: RetrainTask) -> str:
        """What answers requests meanwhile, as the failure alerts say it."""
        served = task.slot.model_version
        if served == COLD_START_VERSION:
            return "no student is live: the teacher keeps answering requests (cold start)"
        if served == NO_STUDENT_VERSION:
            return "no student is live: requests keep waiting in Kafka (cold start, serve: hold)"
        return f"the live student keeps serving ({served})"

    def _plan_retry(
        self, task: RetrainTask, why: str, result: JobResult | None = None
    ) -> RetryPlan:
        """The wait after a failed attempt; kept in the task's state (and, by the caller,
        in the failure's alert)."""
        n_labels = len(task.policy.labels) if task.policy.labels else None
        attempt = result.attempts[-1] if result is not None and result.attempts else None
        state = self._states[task.name]
        cold = task.slot.model_version in (COLD_START_VERSION, NO_STUDENT_VERSION)
        seeds = seed_signature(task.seed_files)
        if attempt is None:
            plan = plan_retry(
                task.config,
                task.policy.kind.value,
                n_labels,
                failed_at=self._clock(),
                cold_start=cold,
                why=why,
                seeds=seeds,
                errors=(state.retry.errors if state.retry is not None else 0) + 1,
            )
            if state.retry is not None:  # an earlier failure's grown size still holds
                plan = dataclasses.replace(plan, size=max(plan.size, state.retry.size))
        else:
            plan = plan_retry(
                task.config,
                task.policy.kind.value,
                n_labels,
                failed_at=self._clock(),
                cold_start=cold,
                size=int(attempt["size"]),
                selected=int(attempt["selection"]["selected"]),
                answers=int(attempt["filtering"]["total"]),
                kept=int(attempt["filtering"]["kept"]),
                why=why,
                seeds=seeds,
            )
        state.retry = plan
        return plan

    def _job(self, task: RetrainTask, trigger: Trigger, start_size: int | None = None) -> None:
        work = self._work_dir / task.name / f"job-{uuid.uuid4().hex[:8]}"
        try:
            with _single_flight(task.registry.root) as acquired:
                if not acquired:
                    self._log.info(
                        "retrain.skipped",
                        task=task.name,
                        trigger=trigger,
                        why="another process is retraining this task (registry lock held)",
                    )
                    return
                live = task.registry.live_version()
                self._decision(
                    task,
                    STARTED,
                    severity="info",
                    trigger=trigger,
                    live_version=live,
                    action="selecting inputs, labelling with the teacher, training",
                )
                job = JobInputs(
                    policy=task.policy,
                    config=task.config,
                    teacher=task.teacher,
                    store=self._store,
                    registry=task.registry,
                    base_model_dir=task.base_model_dir,
                    seed_files=task.seed_files,
                    flags_file=task.flags_file,
                    live_version=live,
                    live_model_dir=task.registry.path(live) if live else None,
                    reason=trigger,
                    cancel=self._stop,
                    start_size=start_size,
                )
                result = run_retraining(job, work_dir=work)
                self._after_job(task, result)
        except RetrainCancelled as exc:
            self._log.info("retrain.cancelled", task=task.name, trigger=trigger, why=str(exc))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            plan = self._plan_retry(task, error)
            self._decision(
                task,
                FAILED,
                severity="error",
                trigger=trigger,
                error=error,
                next_attempt=plan.to_dict(),
                action=f"nothing was registered; {self._serving_note(task)}; "
                f"{plan.text()} (cold start or breach; a request by hand starts now)",
            )
            if not isinstance(exc, DistilldError):
                self._log.exception("retrain.unexpected_error", task=task.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _after_job(self, task: RetrainTask, result: JobResult) -> None:
        if result.status == "gate_failed" or result.version is None:
            plan = self._plan_retry(task, result.gate.summary, result)
            self._decision(
                task,
                GATE_FAILED,
                severity="warning",
                gate=result.gate.summary,
                attempts=len(result.attempts),
                examples=result.attempts[-1]["size"] if result.attempts else 0,
                report=str(self._keep_report(task, result)),
                seconds=result.duration_s,
                next_attempt=plan.to_dict(),
                action=f"the candidate is discarded; {self._serving_note(task)}; "
                f"{plan.text()} (cold start or breach; a request by hand starts now)",
            )
            return
        self._states[task.name].retry = None
        version = result.version
        first = task.registry.live_version() is None
        shadow = task.config.shadow
        self._decision(
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
            self._promote(task, version, why=f"gate {result.gate.summary}")
            return
        task.registry.set_state(version, "shadow")  # the next tick starts the shadow run

    def _keep_report(self, task: RetrainTask, result: JobResult) -> Path | None:
        if result.gate_report_path is None or not result.gate_report_path.exists():
            return None
        reports = self._work_dir / task.name / FAILED_GATES_DIR
        reports.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        kept = reports / f"gate-{stamp}.json"
        shutil.copyfile(result.gate_report_path, kept)
        html = result.gate_report_path.with_suffix(".html")
        if html.exists():
            shutil.copyfile(html, kept.with_suffix(".html"))
        return kept

    # ------------------------------------------------------------------ shadow

    def _advance_shadow(self, task: RetrainTask) -> None:
        in_shadow = [m for m in task.registry.list() if m.state == "shadow"]
        state = self._states[task.name]
        if not in_shadow:
            self._end_shadow(task)
            return
        newest = in_shadow[-1]
        for older in in_shadow[:-1]:  # a newer candidate replaces an older one
            task.registry.set_state(older.version, "retired")
        if state.candidate is None or state.candidate.model_version != newest.version:
            self._end_shadow(task)
            if task.load_candidate is None or self._shadow is None:
                self._promote(task, newest.version, why="no shadow run possible here")
                return
            state.candidate = task.load_candidate(
                task.registry.path(newest.version), newest.version
            )
            self._shadow.set_candidate(task.name, state.candidate, task.config.shadow.share)
            self._decision(
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
        self._end_shadow(task)
        if verdict.decision == "promote":
            self._promote(task, newest.version, why=f"shadow: {verdict.why}")
        else:
            task.registry.set_state(newest.version, "retired")
            self._decision(
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

    def _end_shadow(self, task: RetrainTask) -> None:
        state = self._states[task.name]
        if state.candidate is None:
            return
        if self._shadow is not None:
            self._shadow.set_candidate(task.name, None)
        state.candidate.close()
        state.candidate = None

    # ------------------------------------------------------------------ promotion

    def _promote(self, task: RetrainTask, version: str, *, why: str) -> None:
        previous = task.slot.model_version
        manifest = task.registry.promote(version)  # the atomic step: LIVE now names it
        if self._follow_live(task):
            self._decision(
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

    def _follow_live(self, task: RetrainTask) -> bool:
        """Serve the registry's live version; True when it is served now."""
        with self._switching[task.name]:
            return self._follow_live_locked(task)

    def _follow_live_locked(self, task: RetrainTask) -> bool:
        live = task.registry.live_version()
        if live is None or live == task.slot.model_version:
            return live is not None
        state = self._states[task.name]
        if live in state.unservable:
            return False
        previous = task.slot.model_version
        try:
            task.slot.switch(task.registry.path(live), live)
        except Exception as exc:
            state.unservable.add(live)
            can_roll_back = task.registry.previous_live() is not None
            if can_roll_back:
                task.registry.rollback()
            self._decision(
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
        state.retry = None  # a new live version: earlier failures no longer hold it back
        self._log.info("retrain.serving", task=task.name, version=live, previous=previous)
        return True

    # ------------------------------------------------------------------ watch

    def _watch(self, task: RetrainTask) -> None:
        pointer = task.registry.pointer()
        if pointer is None or pointer.retire is None or pointer.retire_state != "retired":
            return  # nothing replaced, or the last change was itself a rollback
        if pointer.version != task.slot.model_version:
            return
        elapsed = self._clock() - pointer.updated_at
        if elapsed > task.config.rollback.watch_window_s:
            return
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
        self._follow_live(task)
        self._decision(
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

    def outcomes(self, task: str) -> dict[str, int]:
        """How many times each decision was taken for ``task`` since the start
        (started, promoted, gate_failed, failed, rolled_back ...): /metrics."""
        with self._lock:
            return dict(self._outcomes.get(task, {}))

    def _decision(self, task: RetrainTask, name: str, **fields: Any) -> None:
        with self._lock:
            counts = self._outcomes.setdefault(task.name, {})
            outcome = name.removeprefix("retrain.")
            counts[outcome] = counts.get(outcome, 0) + 1
        task.sink.decision(task.name, name, **fields)

    def _last_retry(self, task: str) -> RetryPlan | None:
        # A failed attempt's wait survives a restart: its plan is in the failure's alert,
        # unless a candidate or a promotion came after it.
        with contextlib.suppress(Exception):
            pointer = self._tasks[task].registry.pointer()
            for event in reversed(self._store.last_alerts(task, limit=200)):  # newest first
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

    def _last_start(self, task: str) -> float | None:
        # The cooldown survives a restart: the last start is in the alert records.
        with contextlib.suppress(Exception):
            for event in reversed(self._store.last_alerts(task, limit=200)):  # newest first
                if event.kind == STARTED:
                    return event.created_at
        return None


def seed_signature(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime in ns) of each seed file: a change makes its inputs new."""
    signature = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            signature.append((str(path), -1, -1))
        else:
            signature.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


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


@contextlib.contextmanager
def _single_flight(root: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on the task's registry: one retraining at a time
    across every process that shares it. Released by the OS if the process dies."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".retrain.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

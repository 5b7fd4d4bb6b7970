"""Runs one retraining job on its thread: one at a time per task across processes (a
lock file on the registry), the job itself (:func:`~distilld.retrain.run.run_retraining`),
and what a failed attempt leaves: one alert with the reason and the retry plan
(:func:`~distilld.retrain.decide.plan_retry`), which the failure's alert keeps across a
restart. A candidate is handed to the rollout."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from distilld.errors import DistilldError
from distilld.log import get_logger
from distilld.retrain.decide import RetryPlan, Trigger, plan_retry
from distilld.retrain.gate_report import FAILED_GATES_DIR
from distilld.retrain.run import JobInputs, JobResult, RetrainCancelled, run_retraining
from distilld.retrain.task import Decisions, RetrainTask, TaskState
from distilld.serving.swap import COLD_START_VERSION, NO_STUDENT_VERSION
from distilld.store.base import SampleStore

__all__ = ["FAILED", "GATE_FAILED", "STARTED", "JobRunner", "seed_signature"]

STARTED = "retrain.started"
GATE_FAILED = "retrain.gate_failed"
FAILED = "retrain.failed"


class JobRunner:
    """Runs a task's retraining job (on the caller's thread: the triggers start one)."""

    def __init__(
        self,
        *,
        store: SampleStore,
        states: dict[str, TaskState],
        decisions: Decisions,
        work_dir: Path,
        cancel: threading.Event,
        clock: Callable[[], float],
        on_candidate: Callable[[RetrainTask, JobResult], None],
    ) -> None:
        self._store = store
        self._states = states
        self._decisions = decisions
        self._work_dir = work_dir
        self._cancel = cancel  # cancels a job in progress at its next step
        self._clock = clock
        self._on_candidate = on_candidate
        self._log = get_logger("retrain")

    def remove_leftovers(self, tasks: Iterable[str]) -> None:
        """A job killed with its process (SIGKILL, power loss) left its scratch files."""
        for name in tasks:
            for leftover in (self._work_dir / name).glob("job-*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def run(self, task: RetrainTask, trigger: Trigger, start_size: int | None = None) -> None:
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
                self._decisions.record(
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
                    cancel=self._cancel,
                    start_size=start_size,
                )
                result = run_retraining(job, work_dir=work)
                self._after_job(task, result)
        except RetrainCancelled as exc:
            self._log.info("retrain.cancelled", task=task.name, trigger=trigger, why=str(exc))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            plan = self._plan_retry(task, error)
            self._decisions.record(
                task,
                FAILED,
                severity="error",
                trigger=trigger,
                error=error,
                next_attempt=plan.to_dict(),
                action=f"nothing was registered; {serving_note(task)}; "
                f"{plan.text()} (cold start or breach; a request by hand starts now)",
            )
            if not isinstance(exc, DistilldError):
                self._log.exception("retrain.unexpected_error", task=task.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _after_job(self, task: RetrainTask, result: JobResult) -> None:
        if result.status == "gate_failed" or result.version is None:
            plan = self._plan_retry(task, result.gate.summary, result)
            self._decisions.record(
                task,
                GATE_FAILED,
                severity="warning",
                gate=result.gate.summary,
                attempts=len(result.attempts),
                examples=result.attempts[-1]["size"] if result.attempts else 0,
                report=str(self._keep_report(task, result)),
                seconds=result.duration_s,
                next_attempt=plan.to_dict(),
                action=f"the candidate is discarded; {serving_note(task)}; "
                f"{plan.text()} (cold start or breach; a request by hand starts now)",
            )
            return
        self._states[task.name].retry = None
        self._on_candidate(task, result)

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


def serving_note(task: RetrainTask) -> str:
    """What answers requests meanwhile, as the failure alerts say it."""
    served = task.slot.model_version
    if served == COLD_START_VERSION:
        return "no student is live: the teacher keeps answering requests (cold start)"
    if served == NO_STUDENT_VERSION:
        return "no student is live: requests keep waiting in Kafka (cold start, serve: hold)"
    return f"the live student keeps serving ({served})"


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

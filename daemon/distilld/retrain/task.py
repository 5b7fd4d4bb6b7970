"""What the retrain manager's parts share: a task with its parts (:class:`RetrainTask`),
the slot that serves it (:class:`ModelSlot`), the task's trigger state
(:class:`TaskState`) and the record of every decision (:class:`Decisions`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from distilld.alerts import AlertSink
from distilld.policy.model import Policy
from distilld.registry import ModelRegistry
from distilld.retrain.config import RetrainingConfig
from distilld.retrain.decide import RetryPlan
from distilld.serving.base import StudentBackend
from distilld.teacher.base import Teacher

__all__ = ["Decisions", "ModelSlot", "RetrainTask", "TaskState"]


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
class TaskState:
    """A task's trigger state in this process (the rest is in the registry)."""

    job: threading.Thread | None = None  # the retraining job's thread, once started
    last_started_at: float | None = None
    next_cold_start_at: float = 0.0
    retry: RetryPlan | None = None  # after a failed attempt: what the next one waits for

    @property
    def training(self) -> bool:
        return self.job is not None and self.job.is_alive()


class Decisions:
    """Every decision goes to the task's AlertSink (log, store, alerts topic) and is
    counted per task for /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}

    def record(self, task: RetrainTask, name: str, **fields: Any) -> None:
        with self._lock:
            counts = self._counts.setdefault(task.name, {})
            outcome = name.removeprefix("retrain.")
            counts[outcome] = counts.get(outcome, 0) + 1
        task.sink.decision(task.name, name, **fields)

    def counts(self, task: str) -> dict[str, int]:
        with self._lock:
            return dict(self._counts.get(task, {}))

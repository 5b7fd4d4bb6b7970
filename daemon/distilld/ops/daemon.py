"""What the operations server reads and does in a running daemon.

* :class:`DaemonMetrics` builds a :class:`~distilld.telemetry.metrics.MetricsSnapshot`
  at each scrape from counters the daemon keeps anyway (serving loops, shadow
  worker, teachers' budgets, retraining manager, alert sinks' open breaches) and
  from the last monitoring check stored per task (agreement, drift share):
  nothing is computed for it.
* :class:`DaemonAdmin` implements the admin API on the daemon's parts: status
  (as ``distilld status --json``), retrain (the manager's manual trigger),
  promote and rollback (the task's registry; the manager follows the LIVE
  pointer at its next tick, as after ``distilld promote``).
* :func:`readiness_probes`: the broker (every loop joined its consumer group)
  and each task's student (the backend can answer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import Histogram

from distilld.alerts import AlertSink
from distilld.errors import ConfigError
from distilld.ops.http import NotFoundError, Probe, ProbeResult
from distilld.policy.model import Policy
from distilld.registry import ModelRegistry
from distilld.retrain.manager import RetrainManager
from distilld.serving.base import StudentBackend
from distilld.serving.swap import NO_STUDENT_VERSION
from distilld.shadow.worker import ShadowWorker
from distilld.status import task_status
from distilld.store.base import SampleStore
from distilld.teacher.base import Teacher
from distilld.telemetry.metrics import MetricsSnapshot, TaskMetrics
from distilld.traffic.loop import ServingLoop

__all__ = ["DaemonAdmin", "DaemonMetrics", "readiness_probes"]


class DaemonMetrics:
    """``collect`` of the operations server (see the module docstring)."""

    def __init__(
        self,
        policies: Mapping[str, Policy],
        loops: Sequence[ServingLoop],
        backends: Mapping[str, StudentBackend],
        teachers: Mapping[str, Teacher],
        store: SampleStore,
        shadow: ShadowWorker,
        manager: RetrainManager | None,
        sinks: Mapping[str, AlertSink] | None = None,
    ) -> None:
        self._policies = policies
        self._loops = loops
        self._sinks = dict(sinks or {})
        self._backends = backends
        self._teachers = teachers
        self._store = store
        self._shadow = shadow
        self._manager = manager

    def __call__(self) -> MetricsSnapshot:
        tasks: dict[str, TaskMetrics] = {}
        teacher_calls = self._shadow.task_teacher_calls()
        for task in sorted(self._policies):
            requests = 0
            dead: dict[str, int] = {}
            latency: list[Histogram] = []
            for loop in self._loops:
                stats = loop.stats
                requests += stats.answered_by_task.get(task, 0)
                for (name, reason), count in list(stats.dead_lettered_by_task.items()):
                    if name == task:
                        dead[reason] = dead.get(reason, 0) + count
                histogram = stats.latency_by_task.get(task)
                if histogram is not None:
                    latency.append(histogram)
            agreement, drift_share = self._last_check(task)
            teacher = self._teachers.get(task)
            budget = teacher.status().calls_left if teacher is not None else None
            sink = self._sinks.get(task)
            tasks[task] = TaskMetrics(
                requests=requests,
                latency=latency,
                dead_letters=dead,
                teacher_calls=teacher_calls.get(task, 0),
                teacher_budget_left=budget,
                agreement=agreement,
                drift_share=drift_share,
                retrainings=self._manager.outcomes(task) if self._manager is not None else {},
                live_version=self._backends[task].model_version,
                breaches=sink.breaches(task) if sink is not None else {},
            )
        lag: dict[tuple[str, int], int] = {}
        for loop in self._loops:
            for where, records in list(loop.stats.lag_by_partition.items()):
                lag[where] = max(records, lag.get(where, 0))
        return MetricsSnapshot(tasks=tasks, consumer_lag=lag)

    def _last_check(self, task: str) -> tuple[float | None, float | None]:
        check = self._store.last_check(task)
        if check is None:
            return None, None
        accuracy = (check.summary.get("accuracy") or {}).get("overall") or {}
        drift = check.summary.get("drift") or {}
        agreement = accuracy.get("value")
        share = drift.get("drift_share")
        return (
            float(agreement) if isinstance(agreement, int | float) else None,
            float(share) if isinstance(share, int | float) else None,
        )


class DaemonAdmin:
    """The admin API's actions (see the module docstring)."""

    def __init__(
        self,
        policies: Mapping[str, Policy],
        store: SampleStore,
        registries: Mapping[str, ModelRegistry],
        manager: RetrainManager | None,
    ) -> None:
        self._policies = policies
        self._store = store
        self._registries = registries
        self._manager = manager

    def status(self) -> Mapping[str, Any]:
        return {
            task: dataclasses.asdict(
                task_status(policy, self._store, registry=self._registries.get(task))
            )
            for task, policy in sorted(self._policies.items())
        }

    def retrain(self, task: str) -> Mapping[str, Any]:
        self._known(task)
        if self._manager is None or task not in self._registries:
            raise ConfigError(
                f"task {task!r} does not retrain: its policy has no enabled retraining section"
            )
        decision = self._manager.request(task, "manual")
        return {"task": task, "started": decision.start, "why": decision.why}

    def promote(self, task: str, version: str) -> Mapping[str, Any]:
        registry = self._registry(task)
        if not registry.path(version).is_dir():
            raise NotFoundError(f"task {task!r} has no version {version!r} in its registry")
        manifest = registry.promote(version)
        return {"task": task, "live": manifest.version, "note": _FOLLOW}

    def rollback(self, task: str) -> Mapping[str, Any]:
        manifest = self._registry(task).rollback()
        return {"task": task, "live": manifest.version, "note": _FOLLOW}

    def _known(self, task: str) -> None:
        if task not in self._policies:
            raise NotFoundError(f"no task {task!r}; known tasks: {sorted(self._policies)}")

    def _registry(self, task: str) -> ModelRegistry:
        self._known(task)
        registry = self._registries.get(task)
        if registry is None:
            raise ConfigError(
                f"task {task!r} has no model registry: its policy has no enabled retraining section"
            )
        return registry


_FOLLOW = "the daemon switches to the live version at its next retraining tick"


def readiness_probes(
    loops: Sequence[ServingLoop], backends: Mapping[str, StudentBackend]
) -> dict[str, Probe]:
    """Ready: every serving loop joined its consumer group, and no task's student is
    known to be unable to answer (a held cold start, a vLLM server that is down)."""
    probes: dict[str, Probe] = {
        "broker": lambda: ProbeResult(
            all(loop.assigned.is_set() for loop in loops),
            "the consumer groups have not joined the broker yet",
        )
    }
    for task, backend in sorted(backends.items()):
        probes[f"student:{task}"] = _student_probe(task, backend, loops)
    return probes


def _student_probe(
    task: str, backend: StudentBackend, loops: Sequence[ServingLoop]
) -> Callable[[], ProbeResult]:
    def probe() -> ProbeResult:
        if backend.model_version == NO_STUDENT_VERSION:
            return ProbeResult(False, "no student yet (cold start holding requests)")
        if any(task in loop.unavailable_tasks() for loop in loops):
            return ProbeResult(False, "the student is unavailable; requests are held")
        return ProbeResult(True)

    return probe

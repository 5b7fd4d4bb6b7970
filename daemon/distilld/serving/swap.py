"""Backends that let the daemon change who answers a task while it serves.

* :class:`SwappableStudent` wraps the live backend of an in-process task;
  :meth:`~SwappableStudent.swap` replaces it between two batches (promotion,
  rollback). The new model is loaded before the swap, so the swap itself is
  instant and no request waits for a model to load.
* :class:`TeacherAsStudent` answers with the teacher while a task starts cold
  (no student trained yet, ``retraining.cold_start.serve: teacher``).
* :class:`NoStudentYet` answers nothing while a task starts cold with
  ``serve: hold``: it raises BackendUnavailable, so the serving loop keeps the
  requests uncommitted in Kafka until the first student is promoted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from distilld.errors import BackendError, BackendUnavailable
from distilld.serving.base import Prediction, StudentBackend
from distilld.serving.vllm_deployment import VllmDeployment
from distilld.teacher.base import Teacher, TeacherUnavailable

__all__ = [
    "COLD_START_VERSION",
    "NO_STUDENT_VERSION",
    "LocalSlot",
    "NoStudentYet",
    "SwappableStudent",
    "TeacherAsStudent",
    "VllmSlot",
]

# The model version reported while the teacher answers a cold-starting task,
# and while it holds the requests (nothing answers).
COLD_START_VERSION = "teacher"
NO_STUDENT_VERSION = "none"


class SwappableStudent:
    """A backend whose model can be replaced between two batches."""

    def __init__(self, backend: StudentBackend) -> None:
        self._backend = backend
        # Held for a whole batch: a swap waits for the batch in flight, then the
        # next batch uses the new model.
        self._lock = threading.Lock()

    @property
    def model_version(self) -> str:
        return self._backend.model_version

    @property
    def current(self) -> StudentBackend:
        return self._backend

    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        with self._lock:
            backend = self._backend
            predictions = backend.predict(inputs)
        version = backend.model_version
        # Every answer names the version that produced it, even if a swap
        # happens before the loop reads model_version.
        return [
            p
            if p.model_version is not None
            else Prediction(p.output, p.confidence, p.probabilities, p.error, version)
            for p in predictions
        ]

    def swap(self, backend: StudentBackend) -> StudentBackend:
        """Serve with ``backend`` from the next batch on; returns the previous backend
        (the caller closes it)."""
        with self._lock:
            previous, self._backend = self._backend, backend
        return previous

    def close(self) -> None:
        with self._lock:
            self._backend.close()


class TeacherAsStudent:
    """The teacher answers a task that has no student yet (cold start)."""

    def __init__(self, teacher: Teacher) -> None:
        self._teacher = teacher

    @property
    def model_version(self) -> str:
        return COLD_START_VERSION

    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        try:
            answers = self._teacher.label(list(inputs))
        except TeacherUnavailable as exc:
            raise BackendUnavailable(
                f"the teacher answering a cold start is unavailable: {exc}"
            ) from exc
        if len(answers) != len(inputs):
            raise BackendError(
                f"the teacher returned {len(answers)} answers for {len(inputs)} inputs"
            )
        return [
            Prediction(
                output=a.output,
                confidence=a.confidence,
                probabilities=a.probabilities,
                error=a.error,
                model_version=COLD_START_VERSION,
            )
            for a in answers
        ]

    def close(self) -> None:
        """The teacher belongs to the daemon's monitoring; it closes it."""


class NoStudentYet:
    """Holds a cold-starting task's requests in Kafka until its first student is live."""

    def __init__(self, task: str) -> None:
        self._task = task

    @property
    def model_version(self) -> str:
        return NO_STUDENT_VERSION

    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        raise BackendUnavailable(
            f"task {self._task!r} has no student yet (cold start, cold_start.serve: hold); "
            "its requests wait in Kafka until the first student is promoted"
        )

    def close(self) -> None:
        pass


class LocalSlot:
    """The live model of an in-process task: loads a version, then swaps it in."""

    def __init__(
        self,
        student: SwappableStudent,
        load: Callable[[Path, str], StudentBackend],
    ) -> None:
        self.student = student
        self._load = load

    @property
    def model_version(self) -> str:
        return self.student.model_version

    def switch(self, model_dir: Path, version: str) -> None:
        backend = self._load(model_dir, version)  # raises before anything changes
        previous = self.student.swap(backend)
        previous.close()


class VllmSlot:
    """The live model of a vLLM task: the managed server restarts on the new weights."""

    def __init__(self, deployment: VllmDeployment) -> None:
        self.deployment = deployment

    @property
    def model_version(self) -> str:
        return self.deployment.model_version

    def switch(self, model_dir: Path, version: str) -> None:
        self.deployment.switch_model(model_dir, version)

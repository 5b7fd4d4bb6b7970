"""A teacher loaded in-process with transformers.

The teacher is loaded and run exactly like an in-process student
(``distilld.serving.local``): a sequence-classification model whose head
predicts the policy's labels, or a causal LM driven by a prompt (label
scoring, or JSON generation under the output schema). Only the model, its
architecture and its input limits differ, and they come from the policy's
``teacher`` section. It answers on the calling thread: the caller (a
background worker) must keep it off the serving path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from distilld.errors import BackendError, ModelLoadError
from distilld.policy.model import Architecture, Policy, StudentPolicy
from distilld.serving.base import StudentBackend
from distilld.serving.local import load_local_student
from distilld.teacher.base import TeacherAnswer, TeacherError, TeacherStatus
from distilld.teacher.config import TransformersTeacherConfig


class LocalTeacher:
    """A transformers model answering in-process, with its label distribution."""

    def __init__(self, config: TransformersTeacherConfig, policy: Policy, model_dir: Path) -> None:
        prompt = config.prompt or policy.prompt
        if config.architecture is Architecture.causal_lm and prompt is None:
            raise ModelLoadError(
                f"task {policy.task!r}: a causal-lm teacher needs a prompt template; set "
                "teacher.prompt (or the policy's prompt) to a template containing {input}"
            )
        # The policy as the student loader reads it, with the teacher's model settings
        # in place of the student's. model_copy skips validation: StudentPolicy is
        # validated on its own, and the prompt check above is the one cross-field
        # rule that concerns the teacher.
        as_student = policy.model_copy(
            update={
                "prompt": prompt,
                "student": StudentPolicy(
                    model=config.model,
                    architecture=config.architecture,
                    max_input_tokens=config.max_input_tokens,
                    truncation_side=config.truncation_side,
                    max_new_tokens=config.max_new_tokens,
                ),
            }
        )
        self._model_dir = model_dir
        try:
            self._model: StudentBackend | None = load_local_student(
                as_student, model_dir, model_version=f"teacher:{model_dir.name}"
            )
        except ModelLoadError as exc:
            # The loader is shared with students and its messages name student.* fields.
            raise ModelLoadError(
                f"could not load the teacher from {model_dir} (read student.* below as "
                f"teacher.*): {exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"LocalTeacher(model_dir={str(self._model_dir)!r})"

    def label(self, inputs: Sequence[str]) -> list[TeacherAnswer]:
        if self._model is None:
            raise TeacherError(f"{self!r} is closed; load the teacher again to label inputs")
        try:
            predictions = self._model.predict(inputs)
        except BackendError as exc:
            raise TeacherError(f"the in-process teacher failed: {exc}") from exc
        return [
            TeacherAnswer(
                output=p.output,
                confidence=p.confidence,
                probabilities=p.probabilities,
                error=p.error,
            )
            for p in predictions
        ]

    def status(self) -> TeacherStatus:
        if self._model is None:
            return TeacherStatus(available=False, reason="closed")
        return TeacherStatus(available=True)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None

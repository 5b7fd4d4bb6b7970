"""A teacher-labelled training example and the soft targets it can carry."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distilld.errors import TrainingError
from distilld.teacher.base import TeacherAnswer

# What each example's soft loss was computed from (counted in training.json).
SOFT_NONE = "none"
SOFT_LABELS = "label_distribution"
SOFT_TOP_K = "top_k_tokens"


@dataclass(frozen=True)
class TrainingExample:
    """One input with the teacher's answer.

    ``output`` is the label (classification) or the JSON object (extraction,
    generation). ``confidence`` is the teacher's, in [0, 1] (curriculum
    difficulty). ``probabilities`` is the teacher's distribution over the
    labels, if known. ``top_logprobs`` is, for causal-LM students, the
    teacher's top-k log-probabilities at each token of its answer (token text
    -> log-probability, one mapping per answer token, as OpenAI-compatible
    servers report them); it is used only when the teacher's answer tokens
    line up with the student's (same tokenizer family).
    """

    text: str
    output: str | dict[str, Any]
    confidence: float = 1.0
    probabilities: Mapping[str, float] | None = None
    top_logprobs: Sequence[Mapping[str, float]] | None = None

    @classmethod
    def from_answer(cls, text: str, answer: TeacherAnswer) -> TrainingExample:
        """The example for ``text`` from the teacher's answer (which must have no error)."""
        if answer.error is not None:
            raise TrainingError(
                f"the teacher's answer to {text[:60]!r} has an error ({answer.error}); "
                "filter failed answers out before training"
            )
        return cls(
            text=text,
            output=answer.output,
            confidence=answer.confidence,
            probabilities=answer.probabilities,
            top_logprobs=answer.top_logprobs,
        )


def label_distribution(example: TrainingExample, labels: Sequence[str]) -> list[float] | None:
    """The teacher's probabilities in ``labels`` order, renormalised; None if unknown."""
    if example.probabilities is None:
        return None
    row = [max(0.0, float(example.probabilities.get(label, 0.0))) for label in labels]
    total = sum(row)
    if not total > 0 or not math.isfinite(total):
        return None
    return [p / total for p in row]

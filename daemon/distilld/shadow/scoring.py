"""Turning the teacher's answers and the student's into comparisons to store. Pure.

:func:`score_batch` scores each sampled request's student answer against the
teacher's answer with :func:`distilld.shadow.compare.compare`. Answers the
teacher gave but that are unusable (``TeacherAnswer.error`` set: a label
outside the set, JSON failing the schema) are counted and not stored: a
comparison needs a teacher label to score against, and a stored row without a
score would take a place in the accuracy window while saying nothing about the
student.

A candidate version in shadow answers a stable share of the compared requests
(:func:`in_share`, :func:`candidate_inputs`); its answers replace the live
student's in the sampled requests (:func:`as_candidate`) and are scored the
same way, against the same teacher answers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

from distilld.serving.base import Prediction
from distilld.shadow.compare import CompareError, compare
from distilld.shadow.task import Sampled, ShadowTask
from distilld.store.base import StoredComparison
from distilld.teacher.base import TeacherAnswer
from distilld.vocabulary import TaskKind


@dataclass(frozen=True)
class ScoredBatch:
    """The comparisons of one batch: ``records`` to store, ``unusable`` teacher
    answers skipped, ``failures`` (request id, why) of answers that could not be
    scored."""

    records: list[StoredComparison]
    unusable: int
    failures: list[tuple[str, str]]


def score_batch(
    task: ShadowTask,
    batch: Sequence[Sampled],
    answers: Sequence[TeacherAnswer],
    *,
    created_at: float,
) -> ScoredBatch:
    """Score each sampled request against the teacher's answer at the same position."""
    records: list[StoredComparison] = []
    failures: list[tuple[str, str]] = []
    unusable = 0
    for sampled, answer in zip(batch, answers, strict=True):
        if answer.error is not None:
            unusable += 1
            continue
        item = sampled.offer
        try:
            result = compare(
                TaskKind(task.kind),
                item.output,
                answer.output,
                labels=task.labels,
                schema=task.schema,
            )
        except CompareError as exc:
            failures.append((item.request_id, str(exc)))
            continue
        records.append(
            StoredComparison(
                task=task.task,
                request_id=item.request_id,
                segment=sampled.segment,
                input_text=item.text,
                student_output=item.output,
                student_confidence=item.confidence if item.confidence is not None else 0.0,
                model_version=item.model_version,
                teacher_output=answer.output,
                teacher_confidence=answer.confidence,
                teacher_probabilities=answer.probabilities,
                score=result.score,
                # None: the task has no label set or schema, nothing to fail.
                schema_valid=result.schema_valid is not False,
                created_at=created_at,
            )
        )
    return ScoredBatch(records=records, unusable=unusable, failures=failures)


def in_share(request_id: str, share: float) -> bool:
    """Whether a request falls in the first ``share`` of the id space (stable across
    restarts and replicas, unlike a random draw)."""
    if share >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def candidate_inputs(
    batch: Sequence[Sampled], answers: Sequence[TeacherAnswer], share: float
) -> list[int]:
    """The positions in ``batch`` a candidate in shadow answers: a usable teacher
    answer to score against, and the request in the candidate's ``share``."""
    return [
        i
        for i, sampled in enumerate(batch)
        if answers[i].error is None and in_share(sampled.offer.request_id, share)
    ]


def as_candidate(kind: str, sampled: Sampled, prediction: Prediction, version: str) -> Sampled:
    """The sampled request as the candidate ``version`` answered it."""
    return Sampled(
        offer=replace(
            sampled.offer,
            # An invalid JSON answer scores as an empty object.
            output=(
                prediction.output if prediction.error is None or kind == "classification" else {}
            ),
            confidence=prediction.confidence,
            model_version=version,
        ),
        segment=sampled.segment,
    )

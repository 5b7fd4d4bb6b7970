"""Stored records for tests that judge what the store holds (not how it got there)."""

from __future__ import annotations

from distilld.store.base import StoredComparison


def comparison(
    request_id: str, version: str, score: float | None, at: float = 0.0, task: str = "reviews"
) -> StoredComparison:
    """One comparison of ``version``'s answer with the teacher's, scored ``score``."""
    return StoredComparison(
        task=task,
        request_id=request_id,
        segment={},
        input_text=f"text {request_id}",
        student_output="fresh",
        student_confidence=0.9,
        model_version=version,
        teacher_output="fresh",
        teacher_confidence=0.9,
        teacher_probabilities=None,
        score=score,
        schema_valid=True,
        created_at=at,
    )

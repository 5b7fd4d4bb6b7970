"""The in-process transformers teacher on real cached models (MiniLM + head, SmolLM2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distilld.errors import ModelLoadError
from distilld.policy.model import Policy
from distilld.teacher.base import Teacher, TeacherError
from distilld.teacher.config import TransformersTeacherConfig
from distilld.teacher.local import LocalTeacher

LABELS = ["fresh", "rotten"]
TRAFFIC = {"requests_topic": "req", "responses_topic": "resp", "dead_letter_topic": "dead"}
REVIEWS = [
    "A triumph! Funny, moving and beautifully shot.",
    "A dull, lifeless film with no redeeming qualities.",
    "",
    " ".join(f"word{i % 97}" for i in range(3_000)),  # far longer than the encoder takes
]


def policy(labels: list[str] | None = None) -> Policy:
    """A classification task whose student is a sequence classifier (no prompt)."""
    document: dict[str, Any] = {
        "task": "reviews",
        "kind": "classification",
        "labels": labels or LABELS,
        "traffic": TRAFFIC,
        "student": {"model": "student"},
    }
    return Policy.model_validate(document)


@pytest.fixture(scope="module")
def minilm_teacher(minilm_sentiment_dir: Path) -> Iterator[LocalTeacher]:
    config = TransformersTeacherConfig(model="teacher", max_input_tokens=64)
    teacher = LocalTeacher(config, policy(), minilm_sentiment_dir)
    yield teacher
    teacher.close()


def test_sequence_classifier_teacher_returns_label_distributions(
    minilm_teacher: LocalTeacher,
) -> None:
    assert isinstance(minilm_teacher, Teacher)
    assert minilm_teacher.status().available
    answers = minilm_teacher.label(REVIEWS)
    assert len(answers) == len(REVIEWS)
    for answer in answers:
        assert answer.error is None
        assert answer.output in LABELS
        assert answer.probabilities is not None
        assert sorted(answer.probabilities) == LABELS
        assert sum(answer.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert answer.confidence == max(answer.probabilities.values())
    assert minilm_teacher.label([]) == []


def test_teacher_refuses_a_model_for_another_label_set(minilm_sentiment_dir: Path) -> None:
    config = TransformersTeacherConfig(model="teacher")
    with pytest.raises(ModelLoadError, match="teacher"):
        LocalTeacher(config, policy(["positive", "negative"]), minilm_sentiment_dir)


def test_causal_lm_teacher_needs_a_prompt(tmp_path: Path) -> None:
    config = TransformersTeacherConfig(model="teacher", architecture="causal-lm")
    with pytest.raises(ModelLoadError, match=r"teacher\.prompt"):
        LocalTeacher(config, policy(), tmp_path)


def test_missing_model_directory_names_the_teacher(tmp_path: Path) -> None:
    config = TransformersTeacherConfig(model="teacher")
    with pytest.raises(ModelLoadError, match="could not load the teacher"):
        LocalTeacher(config, policy(), tmp_path / "absent")


def test_causal_lm_teacher_uses_its_own_prompt(smollm2_dir: Path) -> None:
    # The policy's student is a sequence classifier without a prompt; the
    # teacher is a chat model that brings its own.
    config = TransformersTeacherConfig(
        model="teacher",
        architecture="causal-lm",
        prompt="Is this movie review fresh or rotten? Answer with one word.\nReview: {input}",
        max_input_tokens=64,
    )
    teacher = LocalTeacher(config, policy(), smollm2_dir)
    try:
        answers = teacher.label(REVIEWS[:2])
    finally:
        teacher.close()
    for answer in answers:
        assert answer.output in LABELS
        assert answer.probabilities is not None
        assert answer.confidence == max(answer.probabilities.values())
    assert not teacher.status().available
    with pytest.raises(TeacherError, match="closed"):
        teacher.label(["x"])

"""Scoring a batch of teacher answers against the student's, and a candidate's share: pure."""

from __future__ import annotations

from distilld.monitoring.config import SamplingConfig
from distilld.serving.base import Prediction
from distilld.shadow.scoring import as_candidate, candidate_inputs, in_share, score_batch
from distilld.shadow.task import Offer, Sampled, ShadowTask
from distilld.teacher.base import TeacherAnswer

TASK = ShadowTask(
    task="reviews",
    kind="classification",
    sampling=SamplingConfig(),
    teacher=None,
    labels=("positive", "negative"),
)


def sampled(request_id: str, output: str, segment: dict[str, str] | None = None) -> Sampled:
    offer = Offer(
        task="reviews",
        request_id=request_id,
        text=f"text of {request_id}",
        metadata={},
        output=output,
        confidence=None,
        model_version="v1",
        created_at=1.0,
    )
    return Sampled(offer, segment or {"length": "<64"})


def test_score_batch_scores_usable_answers_and_counts_the_rest() -> None:
    batch = [sampled("a", "positive"), sampled("b", "negative"), sampled("c", "positive")]
    answers = [
        TeacherAnswer(output="positive", confidence=0.9),
        TeacherAnswer(output="positive", confidence=0.8),
        TeacherAnswer(output="maybe", confidence=0.5, error="not a label"),
    ]

    scored = score_batch(TASK, batch, answers, created_at=42.0)

    assert [(r.request_id, r.score) for r in scored.records] == [("a", 1.0), ("b", 0.0)]
    assert scored.unusable == 1
    assert scored.failures == []
    first = scored.records[0]
    assert first.student_confidence == 0.0  # unknown confidence is stored as 0
    assert first.teacher_confidence == 0.9
    assert first.created_at == 42.0
    assert first.segment == {"length": "<64"}


def test_candidate_answers_only_usable_requests_in_its_share() -> None:
    batch = [sampled(f"r{i}", "positive") for i in range(200)]
    answers = [TeacherAnswer(output="positive", confidence=1.0) for _ in batch]
    answers[0] = TeacherAnswer(output="", confidence=0.0, error="refused")

    everything = candidate_inputs(batch, answers, 1.0)
    half = candidate_inputs(batch, answers, 0.5)

    assert everything == list(range(1, 200))
    assert 0 < len(half) < len(everything)
    # Stable: the same request ids fall in the same share every time.
    assert half == [i for i in range(1, 200) if in_share(f"r{i}", 0.5)]


def test_as_candidate_takes_the_candidates_answer_and_version() -> None:
    item = sampled("a", "positive")
    answer = as_candidate("classification", item, Prediction("negative", 0.7), "v2")
    assert (answer.offer.output, answer.offer.confidence, answer.offer.model_version) == (
        "negative",
        0.7,
        "v2",
    )
    invalid = Prediction("{not json", 0.2, error="output is not valid JSON")
    assert as_candidate("extraction", item, invalid, "v2").offer.output == {}

"""Swapping the live model between batches, and the cold-start backends.

The loop-mechanics fakes (``FakeStudent``, ``ScriptedTeacherFake`` here) stand in
for models: what is tested is who answers and with which version, not a model.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from distilld.errors import BackendUnavailable
from distilld.serving.fake import FakeStudent
from distilld.serving.swap import (
    COLD_START_VERSION,
    NoStudentYet,
    SwappableStudent,
    TeacherAsStudent,
)
from distilld.teacher.base import TeacherAnswer, TeacherStatus, TeacherUnavailable

LABELS = ["fresh", "rotten"]


class ScriptedTeacherFake:
    """A teacher stand-in that answers every input with one label, or is down."""

    def __init__(self, label: str) -> None:
        self.label_to_give = label
        self.down = False

    def label(self, inputs: Sequence[str]) -> list[TeacherAnswer]:
        if self.down:
            raise TeacherUnavailable("fake outage", retry_after_s=1.0)
        return [TeacherAnswer(self.label_to_give, 0.9, {self.label_to_give: 0.9}) for _ in inputs]

    def status(self) -> TeacherStatus:
        raise NotImplementedError

    def close(self) -> None:
        pass


def test_every_answer_names_the_version_that_gave_it_across_a_swap() -> None:
    old, new = FakeStudent(LABELS, version="v1"), FakeStudent(LABELS, version="v2")
    student = SwappableStudent(old)

    before = student.predict(["a", "b"])
    previous = student.swap(new)
    after = student.predict(["a"])

    assert previous is old
    assert {p.model_version for p in before} == {"v1"}
    assert {p.model_version for p in after} == {"v2"}
    assert student.model_version == "v2"
    assert old.batches == [2] and new.batches == [1]


def test_a_swap_waits_for_the_batch_in_flight() -> None:
    started, release = threading.Event(), threading.Event()

    class SlowFake(FakeStudent):
        def predict(self, inputs: Sequence[str]):  # type: ignore[no-untyped-def]
            started.set()
            release.wait(5)
            return super().predict(inputs)

    student = SwappableStudent(SlowFake(LABELS, version="v1"))
    results: list[str | None] = []
    worker = threading.Thread(
        target=lambda: results.extend(p.model_version for p in student.predict(["x"]))
    )
    worker.start()
    assert started.wait(5)
    swapper = threading.Thread(target=student.swap, args=(FakeStudent(LABELS, version="v2"),))
    swapper.start()
    swapper.join(0.3)
    assert swapper.is_alive()  # blocked behind the batch
    release.set()
    worker.join(5)
    swapper.join(5)

    assert results == ["v1"]
    assert student.model_version == "v2"


def test_the_teacher_answers_a_cold_start_and_an_outage_holds_the_requests() -> None:
    teacher = ScriptedTeacherFake("rotten")
    backend = TeacherAsStudent(teacher)

    answers = backend.predict(["a", "b"])

    assert [a.output for a in answers] == ["rotten", "rotten"]
    assert {a.model_version for a in answers} == {COLD_START_VERSION}
    teacher.down = True
    with pytest.raises(BackendUnavailable, match="cold start is unavailable"):
        backend.predict(["a"])


def test_holding_a_cold_start_raises_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="has no student yet"):
        NoStudentYet("reviews").predict(["a"])

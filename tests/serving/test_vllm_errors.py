"""How the vLLM student backend turns a batch's HTTP failures into the serving loop's two cases.

The server is an ``httpx.MockTransport`` stand-in answering like vLLM: ``/classify``
and ``/v1/chat/completions`` per input, ``/health`` as the test says. A 5xx is an
outage (hold the batch) only when ``/health`` does not answer 200; on a healthy
server it is about an input (BackendError: the loop isolates and dead-letters it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from distilld.errors import BackendError, BackendUnavailable, EndpointUnavailable
from distilld.serving.vllm import VllmStudent, VllmTarget, batch_failure

LABELS = ("fresh", "rotten")


class VllmStandIn:
    """Answers /classify with ``fresh``, except HTTP ``fail_status`` for inputs
    containing ``poison``; /health answers ``health`` (an int status)."""

    def __init__(self, poison: str = "POISON", fail_status: int = 500) -> None:
        self.poison = poison
        self.fail_status = fail_status
        self.health = 200
        self.unreachable_for: str | None = None  # inputs containing it get no answer
        self.inputs: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(self.health)
        text = json.loads(request.content)["input"][0]
        self.inputs.append(text)
        if self.unreachable_for is not None and self.unreachable_for in text:
            raise httpx.ConnectError("connection refused", request=request)
        if self.poison in text:
            return httpx.Response(self.fail_status, json={"error": "Internal Server Error"})
        return httpx.Response(200, json={"data": [{"label": "fresh", "probs": [0.8, 0.2]}]})


@pytest.fixture
def stand_in() -> VllmStandIn:
    return VllmStandIn()


@pytest.fixture
def student(stand_in: VllmStandIn) -> Iterator[VllmStudent]:
    made = classify_student(stand_in)
    yield made
    made.close()


def classify_student(handler: Callable[[httpx.Request], httpx.Response]) -> VllmStudent:
    target = VllmTarget(base_url="http://vllm.test", model="m", kind="classify", labels=LABELS)
    return VllmStudent(target, "v1", transport=httpx.MockTransport(handler))


def test_a_5xx_on_a_healthy_server_is_about_an_input(
    student: VllmStudent, stand_in: VllmStandIn
) -> None:
    with pytest.raises(BackendError) as caught:
        student.predict(["good one", "POISON pill", "good two"])
    assert not isinstance(caught.value, BackendUnavailable)
    assert "HTTP 500" in str(caught.value) and "/health answers 200" in str(caught.value)
    # Every request of the batch finished before predict gave up.
    assert sorted(stand_in.inputs) == ["POISON pill", "good one", "good two"]
    # Alone, the other inputs are answered.
    assert [p.output for p in student.predict(["good one", "good two"])] == ["fresh", "fresh"]


def test_a_5xx_while_health_fails_is_an_outage(student: VllmStudent, stand_in: VllmStandIn) -> None:
    stand_in.health = 503  # vLLM's /health while its engine is dead
    with pytest.raises(BackendUnavailable, match="HTTP 500"):
        student.predict(["good one", "POISON pill"])


def test_no_answer_for_one_input_is_an_outage_even_next_to_a_5xx(
    student: VllmStudent, stand_in: VllmStandIn
) -> None:
    stand_in.unreachable_for = "lost"
    with pytest.raises(BackendUnavailable, match="ConnectError"):
        student.predict(["POISON pill", "lost one", "good"])


def test_a_4xx_is_about_the_input(stand_in: VllmStandIn) -> None:
    stand_in.fail_status = 400
    student = classify_student(stand_in)
    try:
        with pytest.raises(BackendError, match="HTTP 400") as caught:
            student.predict(["POISON pill"])
        assert not isinstance(caught.value, BackendUnavailable)
    finally:
        student.close()


def test_batch_failure_ranks_the_worst_first() -> None:
    no_answer = EndpointUnavailable("no answer")
    server_error = EndpointUnavailable("HTTP 500", status=500)
    refused = BackendError("HTTP 400")
    assert batch_failure([refused, server_error, no_answer]) is no_answer
    assert batch_failure([refused, server_error]) is server_error
    assert batch_failure([refused]) is refused
    interrupted = KeyboardInterrupt()
    assert batch_failure([no_answer, interrupted]) is interrupted

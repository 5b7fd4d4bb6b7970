"""The student backend contract: a batch of texts in, one prediction per text out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import jsonschema


@dataclass(frozen=True)
class Prediction:
    """One answer of a student.

    ``output`` is the label (classification) or the parsed JSON object
    (extraction / generation). ``confidence`` is in [0, 1]: the label's
    probability, or for JSON the geometric mean of the generated tokens'
    probabilities. ``probabilities`` holds the distribution over labels when
    the backend knows it. ``error`` is set when the student produced an output
    that fails validation (JSON that does not parse or does not match the
    policy's schema); ``output`` is then the raw text the student generated.
    ``model_version`` names the version that answered, for backends that can
    switch versions while serving (None: the backend's ``model_version``).
    """

    output: str | dict[str, Any]
    confidence: float
    probabilities: dict[str, float] | None = None
    error: str | None = None
    model_version: str | None = None


def validated_json(
    text: str, confidence: float, validator: jsonschema.Draft202012Validator
) -> Prediction:
    """A generative student's raw answer checked against the policy's output schema.

    Every backend that generates JSON uses this, so an invalid answer is reported
    the same way whoever produced it: the raw text as output, and ``error``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return Prediction(
            output=text,
            confidence=confidence,
            error=f"output is not valid JSON ({exc.msg} at character {exc.pos})",
        )
    problems = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    if problems:
        first = problems[0]
        where = "/".join(str(p) for p in first.path) or "(root)"
        return Prediction(
            output=text,
            confidence=confidence,
            error=f"output does not match output_schema at {where}: {first.message}",
        )
    return Prediction(output=value, confidence=confidence)


@runtime_checkable
class StudentBackend(Protocol):
    """Answers batches of inputs. Implementations must keep the order of inputs."""

    @property
    def model_version(self) -> str:
        """The version name reported in every response."""
        ...

    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        """Answer every input; raise BackendError if the batch cannot be answered."""
        ...

    def close(self) -> None:
        """Release the model (memory, processes)."""
        ...

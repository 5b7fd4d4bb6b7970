"""The teacher contract: a batch of texts in, one answer per text out.

A teacher labels the samples the student is compared with, and later the
training data. It is slow and may cost money, so callers never put it on the
serving path: a background worker calls :meth:`Teacher.label` and, when the
teacher cannot answer right now (:class:`TeacherUnavailable`), pauses and tries
again later. :meth:`Teacher.status` says whether that is the case without
calling the teacher.

Errors, in the daemon's one exception tree (``distilld.errors``):

* :class:`TeacherUnavailable` (a :class:`BackendUnavailable`): down, timing out,
  circuit breaker open, hourly budget spent. Transient: retry later.
* :class:`TeacherError` (a :class:`BackendError`): every other failure of a
  whole batch (refused credentials, a closed teacher). A problem with one
  input only (an answer outside the label set, JSON that fails the schema, an
  input the endpoint refuses) is not raised: that input's
  :class:`TeacherAnswer` carries ``error`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from distilld.errors import BackendError, BackendUnavailable


class TeacherError(BackendError):
    """The teacher could not answer a batch."""


class TeacherUnavailable(TeacherError, BackendUnavailable):
    """The teacher cannot answer right now, whatever the inputs; try again after
    ``retry_after_s`` seconds (0: as soon as the caller's own back-off allows)."""

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TeacherCircuitOpen(TeacherUnavailable):
    """Recent requests failed; the circuit breaker refuses calls until its reset time."""


class TeacherBudgetExhausted(TeacherUnavailable):
    """The hourly call budget of the policy is spent."""


@dataclass(frozen=True)
class TeacherAnswer:
    """One answer of the teacher.

    ``output`` is the label (classification) or the parsed JSON object
    (extraction / generation). ``confidence`` is in [0, 1]: the label's
    probability, or for JSON the geometric mean of the generated tokens'
    probabilities; 1.0 when the teacher reported no probabilities.
    ``probabilities`` is the distribution over the policy's labels when the
    teacher's top-k log-probabilities (or its classification head) cover every
    label, else None. ``error`` is set when this input got no usable answer
    (an answer outside the label set, JSON that does not parse or match the
    schema, an input the endpoint refused); ``output`` is then the raw text
    (possibly empty) and the answer must not be used as a label.
    """

    output: str | dict[str, Any]
    confidence: float
    probabilities: dict[str, float] | None = None
    error: str | None = None
    top_logprobs: tuple[dict[str, float], ...] | None = None
    """Per answer token, the teacher's top-k tokens and their log-probabilities (an
    OpenAI-compatible teacher asked for logprobs): the soft targets a causal-LM
    student with the same tokenizer is matched against. None when not reported."""


@dataclass(frozen=True)
class TeacherStatus:
    """Whether the teacher takes calls now, and if not, why and for how long."""

    available: bool
    reason: str | None = None  # None when available
    retry_after_s: float = 0.0  # seconds until a call may be admitted again
    calls_left: int | None = None  # budget left in the current hour; None: no budget


@runtime_checkable
class Teacher(Protocol):
    """Labels batches of inputs. Implementations keep the order of inputs."""

    def label(self, inputs: Sequence[str]) -> list[TeacherAnswer]:
        """Answer every input, or raise TeacherUnavailable / TeacherError for the batch."""
        ...

    def status(self) -> TeacherStatus:
        """Availability now, without calling the teacher."""
        ...

    def close(self) -> None:
        """Release connections, threads and models. Safe to call twice."""
        ...

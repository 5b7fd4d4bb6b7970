"""What the shadow worker knows about a task, and the records that move through it.

:class:`ShadowTask` is one task's settings (taken from its policy);
:class:`Offer` is one answered request handed to the worker;
:class:`Sampled` is an offer the sampler chose to compare, with its segment.
"""

from __future__ import annotations

from dataclasses import dataclass

from distilld.monitoring.config import SamplingConfig
from distilld.policy.model import Policy
from distilld.shadow.compare import OutputSchema
from distilld.store.base import Output, TrafficSample
from distilld.teacher.base import Teacher
from distilld.vocabulary import TASK_KINDS


@dataclass(frozen=True)
class ShadowTask:
    """What the worker needs to know about one task (taken from its policy).

    ``teacher`` None: the task's requests only feed the reservoir. ``window``
    is the accuracy monitor's window: the sampler's per-segment counts cover
    that many recent comparisons. ``vocabulary`` (the drift reference's) lets
    the sampler boost inputs with many unknown words.
    """

    task: str
    kind: str
    sampling: SamplingConfig
    teacher: Teacher | None
    labels: tuple[str, ...] | None = None
    schema: OutputSchema | None = None
    window: int = 1000
    vocabulary: frozenset[str] | None = None

    @classmethod
    def from_policy(
        cls,
        policy: Policy,
        teacher: Teacher | None,
        *,
        vocabulary: frozenset[str] | None = None,
    ) -> ShadowTask:
        """The task's settings from its policy; ``teacher`` built from ``policy.teacher``."""
        return cls(
            task=policy.task,
            kind=policy.kind.value,
            sampling=policy.sampling,
            teacher=teacher,
            labels=tuple(policy.labels) if policy.labels is not None else None,
            schema=OutputSchema(policy.output_schema) if policy.output_schema else None,
            window=policy.monitors.accuracy.window,
            vocabulary=vocabulary,
        )

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(
                f"task {self.task!r}: kind must be one of {list(TASK_KINDS)} (received "
                f"{self.kind!r})"
            )
        if self.kind == "generation" and self.schema is None:
            raise ValueError(
                f"task {self.task!r}: a generation task is compared on its output schema; "
                "pass schema=OutputSchema(policy.output_schema)"
            )
        if self.window < 1:
            raise ValueError(f"task {self.task!r}: window must be at least 1 ({self.window})")


@dataclass(frozen=True)
class Offer:
    """One answered request, as the serving loop handed it over."""

    task: str
    request_id: str
    text: str
    metadata: dict[str, str]
    output: Output
    confidence: float | None
    model_version: str
    created_at: float  # wall-clock seconds

    def traffic_sample(self) -> TrafficSample:
        """The request as a row of the traffic reservoir."""
        return TrafficSample(
            task=self.task,
            input_text=self.text,
            metadata=dict(self.metadata),
            student_output=self.output,
            student_confidence=self.confidence if self.confidence is not None else 0.0,
            request_id=self.request_id,
            model_version=self.model_version,
            created_at=self.created_at,
        )


@dataclass(frozen=True)
class Sampled:
    """An offer chosen for comparison, with its segment (pooled, as stored)."""

    offer: Offer
    segment: dict[str, str]

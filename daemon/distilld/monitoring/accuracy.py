"""Student-vs-teacher accuracy over the last comparisons, overall and per segment.

Pure: comparisons in, numbers out. Each comparison carries a ``score`` in
[0, 1] (1/0 agreement for classification, field F1 for extraction, schema
validity for structured generation; see :mod:`distilld.shadow.compare`), and
the measured value is the mean score with a Wilson score interval.

The Wilson interval is exact in form for 0/1 scores. For fractional scores
(F1) it is applied to the mean score: a variable bounded in [0, 1] with mean
p has a variance of at most p(1 - p), so the interval is, if anything, too
wide, never too narrow.

Below ``min_samples`` a value is still reported (a person may want to see
it), but ``sufficient`` is False and policy evaluation gives no verdict.

Each segment key reports at most ``max_values_per_key`` values (the most
frequent in the window); the rest are measured together as ``key=other``, so
the verdicts and alerts of a check stay bounded whatever the stored rows hold.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from distilld.monitoring.config import DEFAULT_MAX_SEGMENT_VALUES, AccuracyMonitorConfig
from distilld.monitoring.features import MonitoringError
from distilld.vocabulary import (
    OTHER_SEGMENT_VALUE,
    OVERALL,
    segment_key,
    segment_label,
    split_segment_label,
)


@dataclass(frozen=True)
class Comparison:
    """One request answered by both the student and the teacher.

    ``segments`` are "key=value" labels (see :func:`segment_labels`), e.g.
    ("kind=review", "length=<64"). ``score`` is the per-comparison metric in
    [0, 1]; ``schema_valid`` is None where the task has no schema.
    ``timestamp`` is in seconds since the epoch.
    """

    task: str
    request_id: str
    segments: tuple[str, ...]
    student_output: Any
    teacher_output: Any
    student_confidence: float | None
    teacher_confidence: float | None
    model_version: str
    score: float
    schema_valid: bool | None
    timestamp: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.score <= 1.0):
            raise MonitoringError(
                f"comparison {self.request_id!r}: score must lie in [0, 1] (received "
                f"{self.score!r}); use the score returned by shadow.compare"
            )
        for label in self.segments:
            if split_segment_label(label) is None:
                raise MonitoringError(
                    f"comparison {self.request_id!r}: segment {label!r} is not of the form "
                    "key=value; build segments with segment_labels()"
                )


def segment_labels(segments: Mapping[str, str]) -> tuple[str, ...]:
    """{"kind": "review", "length": "<64"} -> ("kind=review", "length=<64"), sorted.

    Keys must not contain "=" (it separates key from value); values may.
    """
    labels = []
    for key, value in segments.items():
        if not key or "=" in key:
            raise MonitoringError(f"segment key {key!r} must be non-empty and must not contain '='")
        labels.append(segment_label(key, value))
    return tuple(sorted(labels))


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` at ``confidence``.

    ``successes`` may be fractional (a sum of scores in [0, 1]). For n = 0 the
    interval is the whole [0, 1]: nothing is known.
    """
    if n < 0 or not (0.0 <= successes <= n):
        raise MonitoringError(
            f"wilson_interval needs 0 <= successes <= n (received successes={successes}, n={n})"
        )
    if not (0.0 < confidence < 1.0):
        raise MonitoringError(
            f"wilson_interval needs a confidence level in (0, 1) (received {confidence})"
        )
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denominator
    # At p = 0 (or 1) the lower (upper) bound is exactly 0 (1); the formula
    # only gets there up to rounding.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class AccuracyStat:
    """The mean score of one group of comparisons (overall, or one segment)."""

    segment: str  # OVERALL or a "key=value" label
    samples: int
    value: float | None  # None only when samples == 0
    low: float
    high: float
    min_samples: int

    @property
    def sufficient(self) -> bool:
        """Enough comparisons for a verdict."""
        return self.samples >= self.min_samples


@dataclass(frozen=True)
class AccuracyMeasurement:
    task: str
    metric: str  # what the scores are: agreement, field_f1, schema_valid
    window: int  # the configured window (last N comparisons)
    confidence_level: float
    overall: AccuracyStat
    segments: tuple[AccuracyStat, ...]  # sorted by label; empty when per-segment is off


def _stat(segment: str, scores: Sequence[float], min_samples: int, level: float) -> AccuracyStat:
    n = len(scores)
    total = math.fsum(scores)
    low, high = wilson_interval(min(total, float(n)), n, level)
    return AccuracyStat(
        segment=segment,
        samples=n,
        value=total / n if n else None,
        low=low,
        high=high,
        min_samples=min_samples,
    )


def recent(comparisons: Iterable[Comparison], window: int) -> list[Comparison]:
    """The ``window`` most recent comparisons (by timestamp, then input order)."""
    ordered = sorted(comparisons, key=lambda c: c.timestamp)  # stable for equal times
    return ordered[-window:] if window > 0 else []


def measure_accuracy(
    comparisons: Iterable[Comparison],
    config: AccuracyMonitorConfig,
    *,
    task: str,
    metric: str,
    model_version: str | None = None,
    max_values_per_key: int = DEFAULT_MAX_SEGMENT_VALUES,
) -> AccuracyMeasurement:
    """Mean score and interval over the last ``config.window`` comparisons of ``task``.

    With ``model_version``, only that version's comparisons count (after a
    promotion, the previous student's comparisons say nothing about the new
    one). Comparisons of another task are a caller error. Per segment, each key
    keeps its ``max_values_per_key`` most frequent values; the rest are pooled
    as ``key=other``.
    """
    chosen = []
    for c in comparisons:
        if c.task != task:
            raise MonitoringError(
                f"measure_accuracy for task {task!r} received a comparison of task {c.task!r} "
                f"(request {c.request_id!r}); select one task's comparisons first"
            )
        if model_version is None or c.model_version == model_version:
            chosen.append(c)
    window = recent(chosen, config.window)
    level = config.confidence_level
    overall = _stat(OVERALL, [c.score for c in window], config.min_samples, level)

    segments: tuple[AccuracyStat, ...] = ()
    seg_config = config.segments
    if seg_config.enabled:
        keys = None if seg_config.keys is None else set(seg_config.keys)
        by_segment: dict[str, list[float]] = defaultdict(list)
        for c in window:
            for label in c.segments:
                if keys is None or segment_key(label) in keys:
                    by_segment[label].append(c.score)
        by_segment = pool_rare_values(by_segment, max_values_per_key)
        segments = tuple(
            _stat(label, by_segment[label], seg_config.min_samples, level)
            for label in sorted(by_segment)
        )
    return AccuracyMeasurement(
        task=task,
        metric=metric,
        window=config.window,
        confidence_level=level,
        overall=overall,
        segments=segments,
    )


def pool_rare_values(
    by_segment: Mapping[str, list[float]], max_values: int
) -> dict[str, list[float]]:
    """Keep each key's ``max_values`` most frequent values (ties: by label); pool the
    scores of the others under ``key=other``."""
    by_key: dict[str, list[str]] = defaultdict(list)
    for label in by_segment:
        by_key[segment_key(label)].append(label)
    pooled: dict[str, list[float]] = {}
    for key, labels in by_key.items():
        if len(labels) <= max_values:
            kept, rest = labels, []
        else:
            ranked = sorted(labels, key=lambda label: (-len(by_segment[label]), label))
            kept, rest = ranked[:max_values], ranked[max_values:]
        for label in kept:
            pooled[label] = list(by_segment[label])
        if rest:
            other = segment_label(key, OTHER_SEGMENT_VALUE)
            pooled.setdefault(other, [])
            for label in rest:
                pooled[other].extend(by_segment[label])
    return pooled

"""The validation gate: does a candidate student deserve a shadow run? A pure function.

:func:`evaluate_gate` judges a candidate on the held-out test set (never
trained on: see :mod:`distilld.retrain.split`) and returns a
:class:`~distilld.retrain.gate_report.GateReport` listing every check with its
value, threshold, verdict and reason, renderable to JSON and to a small
self-contained HTML table (:mod:`distilld.retrain.gate_report`).

What the candidate is compared with
-----------------------------------
Gold is the teacher's answers: that is what the student is trained to
reproduce. The teacher is then the reference with a score of 1.0 against
itself, so the primary check asks the candidate's agreement with the
teacher to reach ``1 - margin``. This is the worst-case bound: whatever the
teacher's own accuracy, a student that agrees with it on all but a
``margin`` share of the inputs cannot be more than ``margin`` below it. It
is strict on purpose (the teacher's unknown errors are not given to the
student as slack); a policy with a looser bar widens ``gate.margin``.

When a human gold set exists, each example also carries the teacher's own
answer (``teacher``); the teacher is then scored against gold like the
candidate, and the candidate must be within ``margin`` of the teacher's
score (the seed document's "within 2 points of the teacher").

Checks
------
* ``test_set_size``: at least ``min_test_examples`` examples;
* ``primary_vs_teacher``: the primary metric within ``margin`` of the
  reference;
* ``not_worse_than_live`` (when live student answers are given): the
  primary metric at least the live student's minus ``live_tolerance``, on
  the same examples;
* ``segment:<key>=<value>``: each segment within its own margin of the
  reference on that segment (``gate.margin_for``): metadata segments,
  difficulty buckets (``difficulty=hard|medium|easy``: the terciles of the
  teacher's confidence, hard being the least confident third) and edge-case
  tags (``edge_case=<tag>``). A segment with fewer than
  ``min_segment_size`` examples is reported but not judged (``passed`` is
  None). Metadata keys named ``difficulty`` or ``edge_case`` are left out:
  those names are the gate's own.

The gate passes when no check failed. Verdicts use the point estimates;
the Wilson interval of the candidate's value (for metrics that are means
over examples) is reported beside them so a reader sees how much a small
segment's number can move.

Metrics
-------
Classification: accuracy, and precision, recall and F1 macro-averaged over
the labels present in gold or predictions (as scikit-learn does; an answer
outside the label set is a class with no correct prediction). Extraction
and generation: the mean over examples of field-level precision, recall,
F1 and exact match from :func:`distilld.shadow.compare.field_scores` (the
score accuracy monitoring averages), and the schema-valid share when a
schema is given.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distilld.errors import DistilldError
from distilld.monitoring.accuracy import wilson_interval
from distilld.retrain.data_config import GateConfig, GateMetric, default_metric
from distilld.retrain.gate_report import GateCheck, GateReport
from distilld.shadow.compare import OutputSchema, compare
from distilld.vocabulary import TASK_KINDS, TaskKind, segment_label

__all__ = [
    "CLASSIFICATION_METRICS",
    "FIELD_METRICS",
    "GateError",
    "GateExample",
    "classification_metrics",
    "difficulty_buckets",
    "evaluate_gate",
    "field_metrics",
]

Output = str | dict[str, Any]

CLASSIFICATION_METRICS: tuple[GateMetric, ...] = ("accuracy", "precision", "recall", "macro_f1")
FIELD_METRICS: tuple[GateMetric, ...] = (
    "field_f1",
    "field_precision",
    "field_recall",
    "exact_match",
    "schema_valid",
)
# Metrics that are a mean over examples of a value in [0, 1] (a Wilson interval applies).
MEAN_METRICS = frozenset(
    {"accuracy", "field_f1", "field_precision", "field_recall", "exact_match", "schema_valid"}
)
RESERVED_KEYS = frozenset({"difficulty", "edge_case"})
DIFFICULTY_LEVELS = ("hard", "medium", "easy")
# Float tolerance of the threshold comparisons (0.98 computed two ways must pass).
EPSILON = 1e-9


class GateError(DistilldError):
    """The gate cannot judge: mismatched inputs, a metric the task kind has not, a
    classification answer that is not a label string in gold."""


@dataclass(frozen=True)
class GateExample:
    """One held-out test example with every model's answer.

    ``gold`` is the teacher's answer, or a human gold answer when ``teacher``
    holds the teacher's own. ``live`` is the live student's answer (None:
    no live student, e.g. a first training). ``teacher_confidence`` places
    the example in a difficulty bucket; ``tags`` name why it is an edge case.
    """

    gold: Output
    candidate: Output
    live: Output | None = None
    teacher: Output | None = None
    segment: Mapping[str, str] = field(default_factory=dict)
    teacher_confidence: float | None = None
    tags: tuple[str, ...] = ()
    id: str | None = None


# --------------------------------------------------------------------------- metrics


def classification_metrics(gold: Sequence[str], predicted: Sequence[Any]) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 of ``predicted`` against ``gold``.

    Classes are the labels present in gold or predicted (strings); a
    prediction that is not a string is wrong and predicts no class.
    """
    if len(gold) != len(predicted):
        raise GateError(f"{len(gold)} gold answers but {len(predicted)} predictions")
    if not gold:
        raise GateError("no examples to compute metrics on")
    for g in gold:
        if not isinstance(g, str):
            raise GateError(
                f"classification gold answers must be label strings (received {type(g).__name__})"
            )
    labels = set(gold) | {p for p in predicted if isinstance(p, str)}
    tp: dict[str, int] = defaultdict(int)
    n_pred: dict[str, int] = defaultdict(int)
    n_gold: dict[str, int] = defaultdict(int)
    correct = 0
    for g, p in zip(gold, predicted, strict=True):
        n_gold[g] += 1
        if isinstance(p, str):
            n_pred[p] += 1
            if p == g:
                tp[g] += 1
                correct += 1
    precisions, recalls, f1s = [], [], []
    for label in sorted(labels):
        precision = tp[label] / n_pred[label] if n_pred[label] else 0.0
        recall = tp[label] / n_gold[label] if n_gold[label] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        precisions.append(precision)
        recalls.append(recall)
        f1s.append(f1)
    return {
        "accuracy": correct / len(gold),
        "precision": math.fsum(precisions) / len(labels),
        "recall": math.fsum(recalls) / len(labels),
        "macro_f1": math.fsum(f1s) / len(labels),
    }


def field_metrics(
    kind: TaskKind,
    gold: Sequence[Any],
    predicted: Sequence[Any],
    schema: OutputSchema | Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Mean field precision / recall / F1 / exact match (and schema-valid share with a schema)."""
    if schema is not None and not isinstance(schema, OutputSchema):
        schema = OutputSchema(schema)
    if len(gold) != len(predicted):
        raise GateError(f"{len(gold)} gold answers but {len(predicted)} predictions")
    if not gold:
        raise GateError("no examples to compute metrics on")
    if kind == "generation" and schema is None:
        raise GateError("a generation task is judged on its output schema; pass schema")
    totals: dict[str, list[float]] = defaultdict(list)
    for g, p in zip(gold, predicted, strict=True):
        result = compare(kind, p, g, schema=schema)
        totals["field_precision"].append(result.details["precision"])
        totals["field_recall"].append(result.details["recall"])
        totals["field_f1"].append(result.details["f1"])
        totals["exact_match"].append(result.details["exact_match"])
        if result.schema_valid is not None:
            totals["schema_valid"].append(1.0 if result.schema_valid else 0.0)
    return {name: math.fsum(values) / len(values) for name, values in totals.items()}


def _metrics(
    kind: TaskKind, gold: Sequence[Any], predicted: Sequence[Any], schema: OutputSchema | None
) -> dict[str, float]:
    if kind == "classification":
        return classification_metrics(gold, predicted)
    return field_metrics(kind, gold, predicted, schema)


def difficulty_buckets(confidences: Sequence[float | None]) -> list[str | None]:
    """hard / medium / easy by tercile of the teacher's confidence (by rank, ties in order).

    The least confident third is hard. Examples without a confidence get None.
    """
    known = sorted((c, i) for i, c in enumerate(confidences) if c is not None and not math.isnan(c))
    buckets: list[str | None] = [None] * len(confidences)
    for rank, (_, i) in enumerate(known):
        buckets[i] = DIFFICULTY_LEVELS[min(2, 3 * rank // len(known))]
    return buckets


# --------------------------------------------------------------------------- the gate


def _check_inputs(
    examples: Sequence[GateExample], kind: TaskKind, metric: str, schema: OutputSchema | None
) -> tuple[bool, bool]:
    if kind not in TASK_KINDS:
        raise GateError(
            f"unknown task kind {kind!r}; expected classification, extraction or generation"
        )
    allowed = CLASSIFICATION_METRICS if kind == "classification" else FIELD_METRICS
    if metric not in allowed:
        raise GateError(
            f"primary metric {metric!r} does not apply to {kind} tasks; expected one of "
            f"{list(allowed)}"
        )
    if metric == "schema_valid" and schema is None:
        raise GateError("primary metric schema_valid needs the task's output schema; pass schema")
    with_teacher = sum(e.teacher is not None for e in examples)
    with_live = sum(e.live is not None for e in examples)
    for name, count in (("teacher", with_teacher), ("live", with_live)):
        if 0 < count < len(examples):
            raise GateError(
                f"{count} of {len(examples)} examples have a {name} answer; give it for every "
                "example or for none (both are scored on the same examples)"
            )
    return with_teacher > 0, with_live > 0


def _interval(metric: str, value: float, n: int) -> tuple[float, float] | None:
    if metric not in MEAN_METRICS or n == 0:
        return None
    return wilson_interval(min(float(n), max(0.0, value * n)), n)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def evaluate_gate(
    examples: Sequence[GateExample],
    config: GateConfig,
    *,
    kind: TaskKind,
    schema: OutputSchema | Mapping[str, Any] | None = None,
    segment_keys: Collection[str] | None = None,
) -> GateReport:
    """Judge the candidate on ``examples`` (the held-out test set); see the module docstring.

    ``segment_keys`` overrides ``config.segment_keys`` (the metadata keys
    analysed; unset in both: every key of the examples).
    """
    if schema is not None and not isinstance(schema, OutputSchema):
        schema = OutputSchema(schema)
    metric = config.primary_metric or default_metric(kind)
    has_teacher, has_live = _check_inputs(examples, kind, metric, schema)
    n = len(examples)
    checks: list[GateCheck] = []

    size_ok = n >= config.min_test_examples
    checks.append(
        GateCheck(
            name="test_set_size",
            metric="examples",
            value=float(n),
            threshold=float(config.min_test_examples),
            passed=size_ok,
            why=f"{n} held-out examples"
            + ("" if size_ok else f", fewer than the {config.min_test_examples} required"),
            n=n,
        )
    )
    if n == 0:
        return GateReport(
            kind=kind,
            primary_metric=metric,
            reference="gold" if has_teacher else "teacher",
            margin=config.margin,
            n=0,
            metrics={},
            checks=tuple(checks),
        )

    gold = [e.gold for e in examples]

    def score(indices: Sequence[int], model: str) -> dict[str, float]:
        answers = [getattr(examples[i], model) for i in indices]
        return _metrics(kind, [gold[i] for i in indices], answers, schema)

    everyone = range(n)
    metrics: dict[str, dict[str, float]] = {"candidate": score(everyone, "candidate")}
    if has_teacher:
        metrics["teacher"] = score(everyone, "teacher")
    if has_live:
        metrics["live"] = score(everyone, "live")

    def reference_on(indices: Sequence[int], whole: bool = False) -> float:
        if not has_teacher:
            return 1.0
        return metrics["teacher"][metric] if whole else score(indices, "teacher")[metric]

    # Primary: within the margin of the teacher.
    value = metrics["candidate"][metric]
    reference = reference_on(everyone, whole=True)
    threshold = reference - config.margin
    ok = value >= threshold - EPSILON
    who = "the teacher's score on gold" if has_teacher else "the teacher (reference 1.0)"
    checks.append(
        GateCheck(
            name="primary_vs_teacher",
            metric=metric,
            value=value,
            threshold=threshold,
            passed=ok,
            why=f"{metric} {_fmt(value)} {'>=' if ok else '<'} {_fmt(threshold)} "
            f"({who} {_fmt(reference)} minus margin {config.margin})",
            n=n,
            reference=reference,
            interval=_interval(metric, value, n),
        )
    )

    # Not worse than the live student, on the same examples.
    if has_live:
        live = metrics["live"][metric]
        threshold = live - config.live_tolerance
        ok = value >= threshold - EPSILON
        checks.append(
            GateCheck(
                name="not_worse_than_live",
                metric=metric,
                value=value,
                threshold=threshold,
                passed=ok,
                why=f"{metric} {_fmt(value)} {'>=' if ok else '<'} {_fmt(threshold)} (live "
                f"student {_fmt(live)} minus tolerance {config.live_tolerance})",
                n=n,
                reference=live,
                interval=_interval(metric, value, n),
            )
        )

    # Segments: metadata, difficulty, edge cases.
    keys = segment_keys if segment_keys is not None else config.segment_keys
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        for key, segment_value in e.segment.items():
            if key in RESERVED_KEYS or (keys is not None and key not in keys):
                continue
            groups[segment_label(key, segment_value)].append(i)
        for tag in dict.fromkeys(e.tags):
            groups[segment_label("edge_case", tag)].append(i)
    for i, level in enumerate(difficulty_buckets([e.teacher_confidence for e in examples])):
        if level is not None:
            groups[f"difficulty={level}"].append(i)

    for label in sorted(groups):
        members = groups[label]
        size = len(members)
        margin = config.margin_for(label)
        if size < config.min_segment_size:
            checks.append(
                GateCheck(
                    name=f"segment:{label}",
                    metric=metric,
                    value=score(members, "candidate")[metric],
                    threshold=None,
                    passed=None,
                    why=f"not judged: {size} examples, fewer than min_segment_size "
                    f"{config.min_segment_size}",
                    n=size,
                )
            )
            continue
        seg_value = score(members, "candidate")[metric]
        seg_reference = reference_on(members)
        threshold = seg_reference - margin
        ok = seg_value >= threshold - EPSILON
        checks.append(
            GateCheck(
                name=f"segment:{label}",
                metric=metric,
                value=seg_value,
                threshold=threshold,
                passed=ok,
                why=f"{metric} {_fmt(seg_value)} {'>=' if ok else '<'} {_fmt(threshold)} "
                f"(reference {_fmt(seg_reference)} minus segment margin {margin})",
                n=size,
                reference=seg_reference,
                interval=_interval(metric, seg_value, size),
            )
        )

    return GateReport(
        kind=kind,
        primary_metric=metric,
        reference="gold" if has_teacher else "teacher",
        margin=config.margin,
        n=n,
        metrics=metrics,
        checks=tuple(checks),
    )

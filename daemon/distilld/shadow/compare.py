"""Comparing the student's answer with the teacher's, per task kind.

Pure functions, no I/O. Every comparison yields a :class:`CompareResult` whose
``score`` in [0, 1] is what accuracy monitoring averages:

- classification: agreement, 1.0 when both gave the same label, else 0.0;
- extraction: field-level F1 of the student's fields against the teacher's
  (precision, recall and exact match in ``details``);
- generation (structured output): 1.0 when the student's output matches the
  task's JSON schema, else 0.0 (field F1 against the teacher in ``details``,
  for information: free-form values rarely match word for word).

Extraction compares flattened fields: nested keys become dotted paths
("address.city"), list items share their list's path ("phones[]"), so the
order of a list does not matter, and values are normalised strings
(case-folded, whitespace collapsed, 1 and 1.0 equal). Null and empty values
count as "not extracted".
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

# CompareError is defined in distilld.errors and re-exported here.
from distilld.errors import CompareError as CompareError
from distilld.vocabulary import TaskKind

# Schema errors kept per comparison: enough to see what is wrong, bounded in size.
MAX_SCHEMA_ERRORS = 5


@dataclass(frozen=True)
class CompareResult:
    metric: str  # agreement | field_f1 | schema_valid
    score: float  # in [0, 1]; what accuracy monitoring averages
    schema_valid: bool | None  # None when the task has no label set or schema
    details: Mapping[str, float] = field(default_factory=dict)
    schema_errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class FieldScores:
    precision: float
    recall: float
    f1: float
    exact_match: bool
    matched: int  # fields with the same value on both sides
    student_fields: int
    teacher_fields: int


# --------------------------------------------------------------------------- values


def normalize_value(value: Any) -> str | None:
    """A comparable string for one leaf value, or None for "not extracted".

    Strings: case-folded, whitespace collapsed. Numbers: integral floats as
    integers (1.0 -> "1"). Booleans: "true" / "false" (not numbers).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return str(int(value)) if value.is_integer() else repr(value)
    text = " ".join(str(value).split()).casefold()
    return text or None


def flatten(value: Any, prefix: str = "") -> Counter[tuple[str, str]]:
    """The (path, normalised value) pairs of a JSON value, counted.

    A Counter, not a set: a list may hold the same value twice, and both
    occurrences must be found to match fully.
    """
    pairs: Counter[tuple[str, str]] = Counter()
    if isinstance(value, Mapping):
        for key, item in value.items():
            pairs.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list | tuple):
        for item in value:
            pairs.update(flatten(item, f"{prefix}[]"))
    else:
        normalized = normalize_value(value)
        if normalized is not None:
            pairs[(prefix, normalized)] += 1
    return pairs


def field_scores(student: Any, teacher: Any) -> FieldScores:
    """Field-level precision, recall, F1 and exact match of ``student`` against ``teacher``.

    ``None`` (an unparseable output) has no fields. When a side has no field
    at all, its ratio is 1.0 if the other side has none either (both agree
    there is nothing to extract) and 0.0 otherwise.
    """
    s = flatten(student) if student is not None else Counter()
    t = flatten(teacher) if teacher is not None else Counter()
    matched = sum((s & t).values())
    n_s, n_t = sum(s.values()), sum(t.values())
    precision = matched / n_s if n_s else (1.0 if n_t == 0 else 0.0)
    recall = matched / n_t if n_t else (1.0 if n_s == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return FieldScores(
        precision=precision,
        recall=recall,
        f1=f1,
        exact_match=s == t,
        matched=matched,
        student_fields=n_s,
        teacher_fields=n_t,
    )


# --------------------------------------------------------------------------- schema


class OutputSchema:
    """A task's JSON schema, checked once and compiled for repeated validation."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise CompareError(
                f"the output schema is not a valid JSON Schema (2020-12): {exc.message}"
            ) from None
        self.schema = schema
        self._validator = jsonschema.Draft202012Validator(schema)

    def errors(self, output: Any) -> tuple[str, ...]:
        """Up to MAX_SCHEMA_ERRORS messages, each prefixed by the failing path; () if valid."""
        found = []
        for error in self._validator.iter_errors(output):
            path = "/".join(str(p) for p in error.absolute_path) or "(root)"
            found.append(f"{path}: {error.message}")
            if len(found) == MAX_SCHEMA_ERRORS:
                break
        return tuple(found)


def _as_json(output: Any) -> Any:
    # Backends may hand over raw text; an unparseable answer is an answer
    # with no fields (and, against a schema, an invalid one).
    if isinstance(output, str | bytes):
        try:
            return json.loads(output)
        except ValueError:
            return None
    return output


# --------------------------------------------------------------------------- per kind


def compare_classification(
    student: str, teacher: str, *, labels: Sequence[str] | None = None
) -> CompareResult:
    """Agreement: 1.0 when both gave the same label. With ``labels``, a student label
    outside the set is schema-invalid (and cannot agree with a valid teacher)."""
    valid = None if labels is None else student in labels
    return CompareResult(
        metric="agreement",
        score=1.0 if student == teacher else 0.0,
        schema_valid=valid,
    )


def compare_extraction(
    student: Any, teacher: Any, *, schema: OutputSchema | None = None
) -> CompareResult:
    """Field F1 as the score; precision, recall, exact match in ``details``."""
    student, teacher = _as_json(student), _as_json(teacher)
    scores = field_scores(student, teacher)
    errors = schema.errors(student) if schema is not None else ()
    return CompareResult(
        metric="field_f1",
        score=scores.f1,
        schema_valid=None if schema is None else not errors,
        details=_details(scores),
        schema_errors=errors,
    )


def compare_generation(student: Any, teacher: Any, *, schema: OutputSchema) -> CompareResult:
    """Schema validity as the score; field scores against the teacher in ``details``."""
    student, teacher = _as_json(student), _as_json(teacher)
    errors = schema.errors(student)
    return CompareResult(
        metric="schema_valid",
        score=0.0 if errors else 1.0,
        schema_valid=not errors,
        details=_details(field_scores(student, teacher)),
        schema_errors=errors,
    )


def _details(scores: FieldScores) -> dict[str, float]:
    return {
        "precision": scores.precision,
        "recall": scores.recall,
        "f1": scores.f1,
        "exact_match": 1.0 if scores.exact_match else 0.0,
    }


def compare(
    kind: TaskKind,
    student: Any,
    teacher: Any,
    *,
    labels: Sequence[str] | None = None,
    schema: OutputSchema | None = None,
) -> CompareResult:
    """Dispatch on the task kind (the policy's ``kind``)."""
    if kind == "classification":
        if not isinstance(student, str) or not isinstance(teacher, str):
            raise CompareError(
                "classification answers must be label strings (received "
                f"{type(student).__name__} and {type(teacher).__name__})"
            )
        return compare_classification(student, teacher, labels=labels)
    if kind == "extraction":
        return compare_extraction(student, teacher, schema=schema)
    if kind == "generation":
        if schema is None:
            raise CompareError(
                "a generation task is compared on its output schema, but none was given; "
                "pass the policy's output_schema as OutputSchema(...)"
            )
        return compare_generation(student, teacher, schema=schema)
    raise CompareError(
        f"unknown task kind {kind!r}; expected classification, extraction or generation"
    )

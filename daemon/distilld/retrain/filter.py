"""Quality filtering of teacher-labelled examples: a pure function, and a flags-file loader.

:func:`filter_examples` drops the teacher answers a student must not learn
from, each for the first of these reasons that applies (in this order, so
that every dropped example is counted once):

1. ``flagged``: its request id is in the set human reviewers flagged as
   incorrectly answered (:func:`load_flags` reads that file);
2. ``teacher_error``: the teacher reported no usable answer (``error`` set
   by the teacher client: refused input, unparseable output);
3. ``invalid_output``: the answer fails validation: a label outside the
   policy's label set, or JSON that does not parse or does not match the
   output schema (:class:`~distilld.shadow.compare.OutputSchema`, the one the
   comparisons use);
4. ``low_confidence``: the teacher's confidence is below the policy's
   ``min_teacher_confidence``.

The :class:`FilterReport` says how many were kept and dropped per reason,
with a few examples of each (ids and messages) for the alert log.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distilld.errors import DistilldError
from distilld.shadow.compare import OutputSchema
from distilld.vocabulary import TaskKind

__all__ = [
    "DROP_REASONS",
    "FilterError",
    "FilterReport",
    "Filtered",
    "LabelledExample",
    "OutputValidator",
    "filter_examples",
    "load_flags",
    "parsed_output",
]

DROP_REASONS = ("flagged", "teacher_error", "invalid_output", "low_confidence")
# Messages kept per reason in the report: enough to see what went wrong.
MAX_REPORTED = 5

Output = str | dict[str, Any]


class FilterError(DistilldError):
    """Teacher answers cannot be filtered: a flags file that is missing or malformed,
    a validator asked for a task kind it does not know, an example of the wrong type."""


@dataclass(frozen=True)
class LabelledExample:
    """One input with the teacher's answer, ready to be filtered, split and trained on.

    ``output`` is the label (classification) or the JSON object (extraction,
    generation; a string is parsed). ``confidence`` is the teacher's, in
    [0, 1]. ``probabilities`` is the teacher's distribution over the labels
    and ``top_logprobs`` its top-k token log-probabilities (per answer token),
    when it reported them: the soft targets of distribution matching.
    ``teacher_error`` is set when the teacher gave no usable answer.
    ``segment``, ``tags`` and ``source`` come from the selected input.
    """

    text: str
    output: Output
    confidence: float
    id: str | None = None
    probabilities: Mapping[str, float] | None = None
    top_logprobs: Sequence[Mapping[str, float]] | None = None
    teacher_error: str | None = None
    segment: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    source: str = "traffic"


@dataclass(frozen=True)
class FilterReport:
    total: int
    kept: int
    dropped: Mapping[str, int]  # reason -> count, every reason present
    examples: Mapping[str, tuple[str, ...]]  # reason -> a few "id: message" lines

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "dropped_total": self.dropped_total,
            "examples": {k: list(v) for k, v in self.examples.items() if v},
        }


@dataclass(frozen=True)
class Filtered:
    kept: tuple[LabelledExample, ...]  # in the input order
    dropped: tuple[tuple[LabelledExample, str, str], ...]  # (example, reason, message)
    report: FilterReport


class OutputValidator:
    """Whether a teacher answer is a valid output of the task.

    Classification: a string in ``labels``. Extraction and generation: a JSON
    object (a string is parsed) matching ``schema``. Built once per task; the
    schema is compiled once.
    """

    def __init__(
        self,
        kind: TaskKind,
        *,
        labels: Collection[str] | None = None,
        schema: OutputSchema | Mapping[str, Any] | None = None,
    ) -> None:
        if kind == "classification":
            if labels is None:
                raise FilterError(
                    "a classification task is validated against its labels; pass labels"
                )
            self._labels: frozenset[str] | None = frozenset(labels)
            self._schema: OutputSchema | None = None
        elif kind in ("extraction", "generation"):
            if schema is None:
                raise FilterError(
                    f"{'an' if kind == 'extraction' else 'a'} {kind} task is validated against "
                    "its output schema; pass schema"
                )
            self._labels = None
            self._schema = schema if isinstance(schema, OutputSchema) else OutputSchema(schema)
        else:
            raise FilterError(
                f"unknown task kind {kind!r}; expected classification, extraction or generation"
            )
        self.kind = kind

    def problem(self, output: Any) -> str | None:
        """Why ``output`` is invalid, or None when it is valid."""
        if self._labels is not None:
            if not isinstance(output, str):
                return f"label must be a string (received {type(output).__name__})"
            if output not in self._labels:
                return f"label {output!r} is not one of {sorted(self._labels)}"
            return None
        assert self._schema is not None
        if isinstance(output, str | bytes):
            try:
                output = json.loads(output)
            except ValueError as exc:
                return f"output is not JSON ({exc})"
        errors = self._schema.errors(output)
        return "; ".join(errors) if errors else None


def filter_examples(
    examples: Iterable[LabelledExample],
    *,
    validator: OutputValidator,
    min_confidence: float,
    flagged: Collection[str] = frozenset(),
) -> Filtered:
    """Keep the examples fit to train on; see the module docstring for the reasons."""
    if not 0.0 <= min_confidence <= 1.0:
        raise FilterError(f"min_confidence must lie in [0, 1] (received {min_confidence})")
    kept: list[LabelledExample] = []
    dropped: list[tuple[LabelledExample, str, str]] = []
    counts = dict.fromkeys(DROP_REASONS, 0)
    samples: dict[str, list[str]] = {r: [] for r in DROP_REASONS}
    total = 0
    for example in examples:
        if not isinstance(example, LabelledExample):
            raise FilterError(
                f"filter_examples takes LabelledExample items (received {type(example).__name__})"
            )
        total += 1
        verdict = _verdict(example, validator, min_confidence, flagged)
        if verdict is None:
            kept.append(example)
            continue
        reason, message = verdict
        counts[reason] += 1
        dropped.append((example, reason, message))
        if len(samples[reason]) < MAX_REPORTED:
            samples[reason].append(f"{example.id or '(no id)'}: {message}")
    report = FilterReport(
        total=total,
        kept=len(kept),
        dropped=counts,
        examples={r: tuple(v) for r, v in samples.items()},
    )
    return Filtered(kept=tuple(kept), dropped=tuple(dropped), report=report)


def _verdict(
    example: LabelledExample,
    validator: OutputValidator,
    min_confidence: float,
    flagged: Collection[str],
) -> tuple[str, str] | None:
    if example.id is not None and example.id in flagged:
        return "flagged", "flagged as incorrect by a reviewer"
    if example.teacher_error is not None:
        return "teacher_error", example.teacher_error
    problem = validator.problem(example.output)
    if problem is not None:
        return "invalid_output", problem
    if example.confidence < min_confidence:
        return "low_confidence", f"confidence {example.confidence:.3f} < {min_confidence}"
    return None


def parsed_output(example: LabelledExample) -> LabelledExample:
    """The example with a JSON string output parsed to its object (after filtering)."""
    if isinstance(example.output, str) and example.output.lstrip().startswith("{"):
        try:
            value = json.loads(example.output)
        except ValueError:
            return example
        if isinstance(value, dict):
            return replace(example, output=value)
    return example


# --------------------------------------------------------------------------- flags file


def load_flags(path: str | Path) -> frozenset[str]:
    """The request ids in a reviewers' flags file.

    One id per line, or one JSON object per line with an ``"id"`` (a string
    or an integer); the two forms may be mixed. Blank lines and lines
    starting with ``#`` are skipped; surrounding whitespace is ignored.
    Raises :class:`FilterError` naming the file and line for anything else.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FilterError(
            f"flags file {path} does not exist; create it (one request id per line) or remove "
            "retraining.filtering.flags_file from the policy"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FilterError(f"flags file {path} cannot be read: {exc}") from None
    ids: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            ids.add(_json_id(line, path, number))
        elif line.startswith(("[", '"')):
            raise FilterError(
                f'{path}:{number}: expected a request id or a JSON object with an "id" '
                f"(received {line[:80]!r})"
            )
        else:
            ids.add(line)
    return frozenset(ids)


def _json_id(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise FilterError(f"{path}:{number}: invalid JSON ({exc}): {line[:80]!r}") from None
    if not isinstance(record, dict) or "id" not in record:
        raise FilterError(f'{path}:{number}: a JSON line needs an "id" field: {line[:80]!r}')
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise FilterError(
            f'{path}:{number}: "id" must be a non-empty string or an integer (received {value!r})'
        )
    return str(value)

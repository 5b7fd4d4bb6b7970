"""Quality filtering of teacher answers, and the reviewers' flags file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distilld.retrain.filter import (
    DROP_REASONS,
    FilterError,
    LabelledExample,
    OutputValidator,
    filter_examples,
    load_flags,
    parsed_output,
)

LABELS = ["fresh", "rotten"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}


def _ex(id: str, output: Any, confidence: float = 0.9, **kw: Any) -> LabelledExample:
    return LabelledExample(text=f"text {id}", output=output, confidence=confidence, id=id, **kw)


def test_classification_filter_counts_each_reason_once() -> None:
    examples = [
        _ex("ok", "fresh"),
        _ex("low", "rotten", confidence=0.55),
        _ex("bad-label", "meh"),
        _ex("not-a-string", {"label": "fresh"}),
        _ex("flagged", "fresh", confidence=0.1),  # flagged wins over low confidence
        _ex("error", "", teacher_error="answer outside the label set"),
        _ex("edge", "rotten", confidence=0.6),  # exactly at the threshold: kept
    ]
    result = filter_examples(
        examples,
        validator=OutputValidator("classification", labels=LABELS),
        min_confidence=0.6,
        flagged={"flagged", "unknown-id"},
    )
    assert [e.id for e in result.kept] == ["ok", "edge"]
    report = result.report
    assert report.total == 7 and report.kept == 2 and report.dropped_total == 5
    assert report.dropped == {
        "flagged": 1,
        "teacher_error": 1,
        "invalid_output": 2,
        "low_confidence": 1,
    }
    assert list(report.dropped) == list(DROP_REASONS)
    assert report.examples["low_confidence"] == ("low: confidence 0.550 < 0.6",)
    assert "'meh' is not one of ['fresh', 'rotten']" in report.examples["invalid_output"][0]
    assert "must be a string" in report.examples["invalid_output"][1]
    assert {reason for _, reason, _ in result.dropped} == set(DROP_REASONS)
    as_dict = report.to_dict()
    assert as_dict["dropped_total"] == 5 and "flagged" in as_dict["examples"]


def test_extraction_filter_validates_json_against_the_schema() -> None:
    validator = OutputValidator("extraction", schema=SCHEMA)
    examples = [
        _ex("dict", {"city": "Paris"}),
        _ex("string", '{"city": "Lyon", "zip": "69001"}'),
        _ex("broken", '{"city": '),
        _ex("missing", {"zip": "75001"}),
        _ex("extra", {"city": "Nice", "street": "x"}),
    ]
    result = filter_examples(examples, validator=validator, min_confidence=0.5)
    assert [e.id for e in result.kept] == ["dict", "string"]
    messages = dict((e.id, message) for e, _, message in result.dropped)
    assert messages["broken"].startswith("output is not JSON")
    assert "'city' is a required property" in messages["missing"]
    assert "Additional properties" in messages["extra"]
    assert parsed_output(result.kept[1]).output == {"city": "Lyon", "zip": "69001"}


def test_validator_needs_the_task_contract() -> None:
    with pytest.raises(FilterError, match="labels"):
        OutputValidator("classification")
    with pytest.raises(FilterError, match="schema"):
        OutputValidator("generation")
    with pytest.raises(FilterError, match="unknown task kind"):
        OutputValidator("chat")  # type: ignore[arg-type]
    with pytest.raises(FilterError, match="min_confidence"):
        filter_examples(
            [], validator=OutputValidator("extraction", schema=SCHEMA), min_confidence=2
        )


def test_flags_file_plain_and_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "flags.txt"
    path.write_text(
        "# reviewed on Monday\n"
        "req-1\n"
        "  req-2  \n"
        "\n"
        '{"id": "req-3", "reason": "wrong label"}\n'
        '{"id": 42}\n'
        "req-1\n",
        encoding="utf-8",
    )
    assert load_flags(path) == {"req-1", "req-2", "req-3", "42"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": \n', r"flags.txt:1: invalid JSON"),
        ('ok\n{"reason": "x"}\n', r'flags.txt:2: a JSON line needs an "id"'),
        ('{"id": true}\n', r'"id" must be a non-empty string or an integer'),
        ('["a", "b"]\n', r"flags.txt:1: expected a request id"),
    ],
)
def test_flags_file_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "flags.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(FilterError, match=message):
        load_flags(path)


def test_missing_flags_file(tmp_path: Path) -> None:
    with pytest.raises(FilterError, match="does not exist"):
        load_flags(tmp_path / "nope.txt")

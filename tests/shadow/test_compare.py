"""Student-vs-teacher comparison per task kind, on hand-checked examples."""

from __future__ import annotations

from typing import Any

import pytest

from distilld.shadow.compare import (
    CompareError,
    OutputSchema,
    compare,
    field_scores,
    flatten,
    normalize_value,
)

ADDRESS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "city": {"type": "string"},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    },
    "required": ["city"],
    "additionalProperties": False,
}


def test_classification_agreement() -> None:
    agree = compare("classification", "fresh", "fresh", labels=["fresh", "rotten"])
    assert (agree.metric, agree.score, agree.schema_valid) == ("agreement", 1.0, True)
    differ = compare("classification", "fresh", "rotten")
    assert (differ.score, differ.schema_valid) == (0.0, None)
    outside = compare("classification", "meh", "rotten", labels=["fresh", "rotten"])
    assert (outside.score, outside.schema_valid) == (0.0, False)


def test_extraction_field_scores_on_a_hand_example() -> None:
    teacher = {
        "name": "Ann Lee",
        "address": {"city": "Paris", "zip": "75001"},
        "phones": ["111", "222"],
    }
    student = {
        "name": "ann  lee",  # same after normalisation
        "address": {"city": "Lyon", "zip": "75001"},  # city wrong
        "phones": ["222", "111"],  # order does not matter
        "extra": "x",  # not in the teacher's answer
    }
    # teacher fields: name, address.city, address.zip, phones[] x2 = 5
    # student fields: the same paths + extra = 6; matched: name, zip, 2 phones = 4
    scores = field_scores(student, teacher)
    assert (scores.matched, scores.student_fields, scores.teacher_fields) == (4, 6, 5)
    assert scores.precision == pytest.approx(4 / 6)
    assert scores.recall == pytest.approx(4 / 5)
    assert scores.f1 == pytest.approx(16 / 22)
    assert not scores.exact_match
    result = compare("extraction", student, teacher)
    assert result.metric == "field_f1"
    assert result.score == pytest.approx(16 / 22)
    assert result.details["precision"] == pytest.approx(4 / 6)
    assert result.details["exact_match"] == 0.0
    assert result.schema_valid is None


def test_extraction_identical_up_to_normalisation_is_an_exact_match() -> None:
    teacher = {"street": "1 Main St", "number": 1, "po_box": None, "tags": ["a", "a"]}
    student = {"street": " 1  MAIN st ", "number": 1.0, "tags": ["a", "a"]}
    scores = field_scores(student, teacher)
    assert (scores.precision, scores.recall, scores.f1, scores.exact_match) == (1, 1, 1, True)
    # A list value repeated twice must be found twice.
    assert field_scores({**student, "tags": ["a"]}, teacher).recall == pytest.approx(3 / 4)


def test_extraction_edge_cases() -> None:
    both_empty = field_scores({}, {"city": None})
    assert (both_empty.f1, both_empty.exact_match) == (1.0, True)
    nothing_found = field_scores(None, {"city": "Paris"})
    assert (nothing_found.precision, nothing_found.recall, nothing_found.f1) == (0, 0, 0)
    invented = field_scores({"city": "Paris"}, {})
    assert (invented.precision, invented.recall, invented.f1) == (0, 0, 0)
    # Raw JSON text is parsed; unparseable text has no fields.
    assert compare("extraction", '{"city": "Paris"}', {"city": "paris"}).score == 1.0
    assert compare("extraction", "{not json", {"city": "Paris"}).score == 0.0


def test_normalisation_and_flattening() -> None:
    assert normalize_value(True) == "true"
    assert normalize_value(2.0) == "2"
    assert normalize_value(2.5) == "2.5"
    assert normalize_value("  A  b ") == "a b"
    assert normalize_value("   ") is None
    assert normalize_value(None) is None
    assert flatten({"a": {"b": [1, {"c": "X"}]}}) == {("a.b[]", "1"): 1, ("a.b[].c", "x"): 1}


def test_schema_validity_with_error_paths() -> None:
    schema = OutputSchema(ADDRESS_SCHEMA)
    valid = compare("extraction", {"city": "Paris"}, {"city": "Paris"}, schema=schema)
    assert valid.schema_valid is True
    assert valid.schema_errors == ()
    invalid = compare(
        "extraction", {"city": "Paris", "zip": "7500"}, {"city": "Paris"}, schema=schema
    )
    assert invalid.schema_valid is False
    assert invalid.schema_errors == ("zip: '7500' does not match '^[0-9]{5}$'",)
    missing = schema.errors({"name": "x"})
    assert missing == ("(root): 'city' is a required property",)
    assert schema.errors(None) == ("(root): None is not of type 'object'",)


def test_generation_is_scored_on_schema_validity() -> None:
    schema = OutputSchema(ADDRESS_SCHEMA)
    ok = compare("generation", {"city": "Rome", "name": "Bo"}, {"city": "Paris"}, schema=schema)
    assert (ok.metric, ok.score, ok.schema_valid) == ("schema_valid", 1.0, True)
    assert ok.details["f1"] == 0.0  # informative only: the values differ from the teacher's
    bad = compare("generation", {"town": "Rome"}, {"city": "Paris"}, schema=schema)
    assert (bad.score, bad.schema_valid) == (0.0, False)
    assert len(bad.schema_errors) == 2  # missing city, unexpected town


def test_refusals_say_what_is_wrong() -> None:
    with pytest.raises(CompareError, match="not a valid JSON Schema"):
        OutputSchema({"type": "no-such-type"})
    with pytest.raises(CompareError, match="must be label strings"):
        compare("classification", {"label": "a"}, "a")
    with pytest.raises(CompareError, match="output schema, but none was given"):
        compare("generation", {}, {})
    with pytest.raises(CompareError, match="unknown task kind 'summary'"):
        compare("summary", "a", "b")  # type: ignore[arg-type]
